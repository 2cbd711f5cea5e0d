"""`reelserve serve | generate | tiny`: the command-line entry points."""

from __future__ import annotations

import argparse
import secrets
import sys
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")
# `reelserve serve --max-height 720` etc.; the 422 messages name these flags.
LIMIT_FLAGS = (
    "max_height",
    "max_width",
    "max_num_frames",
    "max_num_inference_steps",
    "max_prompt_chars",
    "max_fps",
    "max_guidance_scale",
)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path, help="checkpoint directory in the diffusers layout")
    p.add_argument("--device", default="cpu", help="torch device for the worker, e.g. cpu or cuda:0")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="weights dtype (default: bf16 on GPU, fp32 on CPU)")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reelserve", description="Serve Wan2.x video generation models.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the HTTP server")
    _add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-queue", type=int, default=None, help="waiting requests before HTTP 429")
    for name in LIMIT_FLAGS:
        serve.add_argument(f"--{name.replace('_', '-')}", type=float if "scale" in name else int, default=None)

    gen = sub.add_parser("generate", help="generate one video to a file")
    _add_model_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt", default="")
    gen.add_argument("-o", "--output", type=Path, default=Path("out.mp4"))
    for name, kind in [
        ("height", int),
        ("width", int),
        ("num-frames", int),
        ("fps", int),
        ("steps", int),
        ("guidance-scale", float),
        ("guidance-scale-2", float),
        ("seed", int),
    ]:
        gen.add_argument(f"--{name}", type=kind, default=None)
    gen.add_argument("--sampler", default="unipc", choices=("unipc", "euler"))
    gen.add_argument("--lossless", action="store_true", help="RGB H.264 at qp 0 (bit-exact frames)")

    tiny = sub.add_parser("tiny", help="write a tiny deterministic Wan2.2 checkpoint")
    tiny.add_argument("out_dir", type=Path)
    tiny.add_argument("--size", default="tiny", help="tiny (tests) or bench (about 300 MB, for benchmarks)")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--wan21", action="store_true", help="one transformer, no boundary (Wan2.1 layout)")
    return parser


def resolve_dtype(name: str | None, device: str):
    import torch

    if name is None:
        name = "float32" if device == "cpu" else "bfloat16"
    return getattr(torch, name)


def _params_from_args(args, spec):
    from serve.engine.request import GenerationParams

    d = spec.defaults

    def pick(value, key):
        return d[key] if value is None else value

    multiple = spec.spatial_multiple
    height, width = pick(args.height, "height"), pick(args.width, "width")
    frames = pick(args.num_frames, "num_frames")
    rounded = (
        max(multiple, height // multiple * multiple),
        max(multiple, width // multiple * multiple),
        (max(frames, 1) - 1) // spec.vae_scale_temporal * spec.vae_scale_temporal + 1,
    )
    if rounded != (height, width, frames):
        print(
            f"note: size rounded to {rounded[1]}x{rounded[0]}, {rounded[2]} frames "
            f"(multiples of {multiple}, frames of the form 4k+1)",
            file=sys.stderr,
        )
    guidance = pick(args.guidance_scale, "guidance_scale")
    return GenerationParams(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        height=rounded[0],
        width=rounded[1],
        num_frames=rounded[2],
        fps=pick(args.fps, "fps"),
        num_inference_steps=pick(args.steps, "num_inference_steps"),
        guidance_scale=guidance,
        guidance_scale_2=args.guidance_scale_2
        if args.guidance_scale_2 is not None
        else d.get("guidance_scale_2", guidance),
        seed=secrets.randbelow(2**31) if args.seed is None else args.seed,
        sampler=args.sampler,
        lossless=args.lossless,
    )


class UserFacingError(Exception):
    """An error whose message already names the file and the fix; printed without a traceback."""


def cmd_generate(args) -> int:
    from tqdm import tqdm

    from serve.loader import CheckpointError
    from serve.pipeline.mp4 import encode_mp4
    from serve.worker.model_runner import ModelRunner

    try:
        runner = ModelRunner.from_checkpoint(args.model, args.device, resolve_dtype(args.dtype, args.device))
    except CheckpointError as e:
        raise UserFacingError(str(e)) from e
    params = _params_from_args(args, runner.spec)
    with tqdm(total=params.num_inference_steps, desc="denoising", unit="step") as bar:
        output = runner.generate(params, on_step=lambda done, total: bar.update(1))
    args.output.write_bytes(encode_mp4(output.frames, params.fps, params.lossless))
    stages = ", ".join(f"{k} {v:.2f}s" for k, v in output.timings.items())
    print(
        f"wrote {args.output} ({params.num_frames} frames {params.width}x{params.height}, seed {params.seed}; {stages})"
    )
    return 0


def cmd_serve(args) -> int:
    from serve.api.server import ServerStartError, run_server
    from serve.config import Limits, ServerConfig

    limits = {name: getattr(args, name) for name in LIMIT_FLAGS if getattr(args, name) is not None}
    queue = {} if args.max_queue is None else {"max_queue": args.max_queue}
    config = ServerConfig(
        model_dir=args.model,
        host=args.host,
        port=args.port,
        device=args.device,
        dtype=args.dtype or ("float32" if args.device == "cpu" else "bfloat16"),
        limits=Limits(**limits),
        **queue,
    )
    try:
        run_server(config)
    except ServerStartError as e:
        raise UserFacingError(str(e)) from e
    return 0


def cmd_tiny(args) -> int:
    from models.tiny import write_tiny_checkpoint

    out = write_tiny_checkpoint(args.out_dir, size=args.size, seed=args.seed, two_experts=not args.wan21)
    print(f"wrote tiny checkpoint to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    handler = {"serve": cmd_serve, "generate": cmd_generate, "tiny": cmd_tiny}[args.command]
    try:
        return handler(args)
    except (FileNotFoundError, ValueError, UserFacingError) as e:
        # Checkpoint and argument problems: one line naming the file and the fix, no traceback.
        print(f"reelserve {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
