"""`reelserve serve | generate | inspect | tiny`: the command-line entry points."""

from __future__ import annotations

import argparse
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
    _add_quant_args(p, "--quant")


def _add_quant_args(p: argparse.ArgumentParser, flag: str) -> None:
    p.add_argument(
        flag,
        default=None,
        help="per-expert quantization, e.g. w8a8-int8 (all experts) or high=w8a8-int8,low=none; "
        "schemes: int8-wo, w8a8-int8, fp8-wo, w8a8-fp8, none",
    )
    p.add_argument(
        "--quant-skip", action="append", default=[], help="regex of extra layers to keep unquantized (repeatable)"
    )


def quant_policy(text: str | None, skip: list[str], model_dir: Path):
    """The `--quant` policy for the checkpoint's experts, or None; ValueError names a bad scheme or expert."""
    from models.wan.spec import read_spec
    from serve.quant.schemes import QuantPolicy

    if text is None:
        return None
    return QuantPolicy.parse(text, read_spec(model_dir).expert_names, tuple(skip))


def _add_fewstep_args(p: argparse.ArgumentParser) -> None:
    from serve.sampling.presets import PRESETS

    p.add_argument(
        "--preset", default=None, choices=sorted(PRESETS), help="few-step schedule: steps, timesteps, no CFG"
    )
    p.add_argument("--lora-dir", action="append", type=Path, default=[], help="directory LoRA files may come from")
    for expert in ("high", "low"):
        p.add_argument(f"--lora-{expert}", type=Path, default=None, help=f"LoRA fused into the {expert}-noise expert")
        p.add_argument(f"--lora-{expert}-scale", type=float, default=1.0)
    p.add_argument("--step-cache-threshold", type=float, default=None, help="first-block cache (off by default)")
    p.add_argument("--vae-tile", type=int, default=None, help="VAE decode tile size in pixels (default: untiled)")
    p.add_argument("--vae-tile-overlap", type=int, default=64, help="pixels adjacent VAE tiles blend over")
    p.add_argument("--vae-chunk-frames", type=int, default=1, help="latent frames per streamed decode chunk")
    p.add_argument("--vae-workers", type=int, default=1, help="threads decoding VAE tiles in parallel")
    p.add_argument(
        "--vae-order",
        default="chunk-major",
        choices=("chunk-major", "tile-major"),
        help="chunk-major streams into the MP4; tile-major uses the least memory",
    )


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reelserve", description="Serve Wan2.x video generation models.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the HTTP server")
    _add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--devices", default=None, help="one worker per device: cuda:0,cuda:1 or auto")
    serve.add_argument("--workers", type=int, default=None, help="worker processes on --device (CPU machines)")
    serve.add_argument("--max-queue", type=int, default=None, help="waiting requests before HTTP 429")
    serve.add_argument("--max-batch-size", type=int, default=None, help="requests sharing one denoising step")
    serve.add_argument("--max-batch-cost-s", type=float, default=None, help="predicted seconds per batched step")
    serve.add_argument("--expert-policy", choices=("min-swap", "fcfs"), default=None)
    serve.add_argument("--request-timeout-s", type=float, default=None, help="fail requests not done by then")
    serve.add_argument("--output-dir", type=Path, default=None, help="where job videos are stored")
    _add_fewstep_args(serve)
    _add_memory_args(serve)
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
    _add_fewstep_args(gen)
    _add_memory_args(gen)

    quantize = sub.add_parser("quantize", help="write a pre-quantized copy of a checkpoint")
    quantize.add_argument("in_dir", type=Path)
    quantize.add_argument("out_dir", type=Path)
    _add_quant_args(quantize, "--scheme")

    inspect = sub.add_parser("inspect", help="parameters, bytes and memory per residency mode (headers only)")
    inspect.add_argument("model_dir", type=Path)
    _add_inspect_args(inspect)

    tiny = sub.add_parser("tiny", help="write a tiny deterministic Wan2.2 checkpoint")
    tiny.add_argument("out_dir", type=Path)
    tiny.add_argument("--size", default="tiny", help="tiny (tests) or bench (about 300 MB, for benchmarks)")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument(
        "--layout",
        default=None,
        choices=("t2v-a14b", "i2v-a14b", "ti2v-5b", "t2v-wan21"),  # models.tiny.LAYOUTS (kept torch-free here)
        help="which repo's diffusers layout to mirror (default t2v-a14b)",
    )
    tiny.add_argument("--wan21", action="store_true", help="same as --layout t2v-wan21 (one transformer, no boundary)")
    return parser


# Flags that shape how the model is loaded and run, shared by `serve` and `generate`.
MODEL_OPTIONS = (
    "vae_tile",
    "vae_tile_overlap",
    "vae_chunk_frames",
    "vae_workers",
    "vae_order",
    "memory_mode",
    "weights_dtype",
    "text_encoder_device",
    "prefetch_blocks",
    "vram",
    "ram",
)
SERVE_OPTIONS = (
    "workers",
    "max_queue",
    "max_batch_size",
    "max_batch_cost_s",
    "expert_policy",
    "request_timeout_s",
    "output_dir",
)


def resolve_devices(spec: str) -> tuple[str, ...]:
    """`auto`: every visible GPU, else one CPU worker; otherwise a comma-separated list."""
    if spec != "auto":
        return tuple(d.strip() for d in spec.split(",") if d.strip())
    import torch

    count = torch.cuda.device_count()
    return tuple(f"cuda:{i}" for i in range(count)) or ("cpu",)


def resolve_dtype(name: str | None, device: str):
    import torch

    if name is None:
        name = "float32" if device == "cpu" else "bfloat16"
    return getattr(torch, name)


def _params_from_args(args, spec):
    """The CLI's request, with model defaults filled and sizes rounded exactly as the API does."""
    from serve.api.params import fill_defaults, round_to_model
    from serve.api.schemas import GenerateRequest
    from serve.engine.request import GenerationParams

    fields = {
        "height": args.height,
        "width": args.width,
        "num_frames": args.num_frames,
        "fps": args.fps,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "guidance_scale_2": args.guidance_scale_2,
        "seed": args.seed,
    }
    body = GenerateRequest(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        sampler=args.sampler,
        lossless=args.lossless,
        preset=args.preset,
        **{k: v for k, v in fields.items() if v is not None},
    )
    values = fill_defaults(body, spec)
    for change in round_to_model(values, spec):
        print(f"note: {change} (multiples of {spec.spatial_multiple}, frames of the form 4k+1)", file=sys.stderr)
    return GenerationParams(**values)


class UserFacingError(Exception):
    """An error whose message already names the file and the fix; printed without a traceback."""


def cmd_generate(args) -> int:
    from tqdm import tqdm

    from models.wan.spec import read_spec
    from serve.engine.client import runner_options
    from serve.loader import CheckpointError
    from serve.pipeline.mp4 import encode_mp4
    from serve.sampling.presets import apply_preset
    from serve.worker.factory import load_model_runner

    spec = read_spec(args.model)
    params = apply_preset(_params_from_args(args, spec))
    # Plan memory for this request's own size, not the server's largest.
    limits = {"max_height": params.height, "max_width": params.width, "max_num_frames": params.num_frames}
    config = server_config(args)
    config = config.model_copy(update={"limits": config.limits.model_copy(update=limits)})
    try:
        runner = load_model_runner(str(config.model_dir), config.device, config.dtype, runner_options(config))
    except CheckpointError as e:
        raise UserFacingError(str(e)) from e
    for line in runner.lora_log:
        print(line, file=sys.stderr)
    with tqdm(total=params.num_inference_steps, desc="denoising", unit="step") as bar:
        output = runner.generate(params, on_step=lambda done, total: bar.update(1))
    args.output.write_bytes(encode_mp4(output.frames, params.fps, params.lossless))
    stages = ", ".join(f"{k} {v:.2f}s" for k, v in output.timings.items())
    print(
        f"wrote {args.output} ({params.num_frames} frames {params.width}x{params.height}, seed {params.seed}; {stages})"
    )
    return 0


def server_config(args, **overrides):
    """The ServerConfig both `serve` and `generate` run with (generate: one in-process runner)."""
    from serve.config import Limits, ServerConfig

    if args.quant is not None:
        quant_policy(args.quant, args.quant_skip, args.model)  # a bad --quant fails here, before loading
    fused = tuple(
        (path, i, getattr(args, f"lora_{name}_scale"))
        for i, name in enumerate(("high", "low"))
        if (path := getattr(args, f"lora_{name}")) is not None
    )
    model_options = {
        "quant": args.quant,
        "quant_skip": tuple(args.quant_skip),
        "lora_dirs": tuple(args.lora_dir),
        "fused_loras": fused,
        "step_cache_threshold": args.step_cache_threshold,
        "default_preset": args.preset,
        **{name: getattr(args, name) for name in MODEL_OPTIONS},
    }
    limits = {name: getattr(args, name, None) for name in LIMIT_FLAGS}
    options = {name: getattr(args, name, None) for name in SERVE_OPTIONS}
    if getattr(args, "devices", None) is not None:
        options["devices"] = resolve_devices(args.devices)
    return ServerConfig(
        model_dir=args.model,
        device=args.device,
        dtype=args.dtype or ("float32" if args.device == "cpu" else "bfloat16"),
        limits=Limits(**{k: v for k, v in limits.items() if v is not None}),
        **{k: v for k, v in (options | overrides).items() if v is not None},
        **model_options,
    )


def cmd_serve(args) -> int:
    from serve.api.server import ServerStartError, run_server

    config = server_config(args, host=args.host, port=args.port)
    try:
        run_server(config)
    except ServerStartError as e:
        raise UserFacingError(str(e)) from e
    return 0


def cmd_quantize(args) -> int:
    from serve.loader import CheckpointError
    from serve.quant.convert import quantize_checkpoint

    if args.scheme is None:
        raise UserFacingError("--scheme is required, e.g. --scheme w8a8-int8 or --scheme high=w8a8-int8,low=none")
    try:
        out = quantize_checkpoint(args.in_dir, args.out_dir, quant_policy(args.scheme, args.quant_skip, args.in_dir))
    except CheckpointError as e:
        raise UserFacingError(str(e)) from e
    print(f"wrote {out} ({args.scheme})")
    return 0


def _add_memory_args(p: argparse.ArgumentParser) -> None:
    from models.inspect import add_memory_args

    add_memory_args(p)


def _add_inspect_args(p: argparse.ArgumentParser) -> None:
    from models.inspect import add_inspect_args, add_memory_args

    add_inspect_args(p)
    add_memory_args(p)


def cmd_inspect(args) -> int:
    from models.inspect import run_inspect
    from serve.loader import CheckpointError
    from serve.loader.planner import budget_from_args, candidates

    try:
        return run_inspect(args, budget_from_args, candidates)
    except CheckpointError as e:
        raise UserFacingError(str(e)) from e


def cmd_tiny(args) -> int:
    from models.tiny import write_tiny_checkpoint

    if args.wan21 and args.layout not in (None, "t2v-wan21"):
        raise ValueError(f"--wan21 means --layout t2v-wan21, not {args.layout}; give one of them")
    layout = args.layout or ("t2v-wan21" if args.wan21 else "t2v-a14b")
    out = write_tiny_checkpoint(args.out_dir, size=args.size, seed=args.seed, layout=layout)
    print(f"wrote tiny checkpoint to {out}")
    return 0


def _one_line(e: Exception) -> str:
    """pydantic's ValidationError lists each bad field over several lines with a docs URL; keep
    just the field (as its flag) and the message, which already says the fix."""
    errors = getattr(e, "errors", None)
    if not callable(errors):
        return str(e)
    parts = []
    for err in errors():
        field = ".".join(str(x) for x in err["loc"] if x != "limits").replace("model_dir", "model")
        message = err["msg"].removeprefix("Value error, ")
        parts.append(f"--{field.replace('_', '-')}: {message}" if field else message)
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    handlers = {"serve": cmd_serve, "generate": cmd_generate, "quantize": cmd_quantize, "tiny": cmd_tiny}
    handler = {**handlers, "inspect": cmd_inspect}[args.command]
    try:
        return handler(args)
    except (FileNotFoundError, ValueError, UserFacingError) as e:
        # Checkpoint and argument problems: one line each naming the file or flag and the fix.
        print(f"reelserve {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
