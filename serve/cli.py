"""`reelserve serve | generate | quantize | inspect | tiny`: the command-line entry points.

The flags of `serve` and `generate` are generated from the config tree (`serve.config.ServerConfig`
and its sub-configs, by `serve.cli_flags`): one flag per field, with the field's type, choices and
docstring; a flag not given leaves the field's default. Two fields have a command line that is not
one plain flag, and an adapter here: `workers.devices` (`--devices cuda:0,cuda:1` or `auto`,
resolved at startup) and `lora.fused` (`--lora-high FILE --lora-high-scale S`, `--lora-low ...`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from pydantic import ValidationError

from serve.cli_flags import Adapter, Flag, add_flags, flag_label, given_values
from serve.config import ServerConfig
from serve.settings_file import CONFIG_ENV, Layered, layer
from serve.settings_file import options as settings_options

LORA_EXPERTS = ("high", "low")  # --lora-high: expert 0 (`transformer`), --lora-low: expert 1 (`transformer_2`)
# `generate` runs one in-process runner: the model and runner flags of the tree, no server,
# worker-pool or scheduler flags.
GENERATE_FIELDS = (
    ("model_dir",),
    ("workers", "device"),
    ("workers", "dtype"),
    ("quant",),
    ("lora",),
    ("sampling",),
    ("vae",),
    ("memory",),
)


def resolve_devices(spec: str) -> tuple[str, ...]:
    """`auto`: every visible GPU, else one CPU worker; otherwise a comma-separated list."""
    if spec != "auto":
        return tuple(d.strip() for d in spec.split(",") if d.strip())
    import torch

    count = torch.cuda.device_count()
    return tuple(f"cuda:{i}" for i in range(count)) or ("cpu",)


def _add_devices_flag(p: argparse.ArgumentParser, f: Flag) -> None:
    p.add_argument(f.name, dest=f.dest, default=None, metavar=f.kwargs.get("metavar"), help=f.kwargs["help"])


def _devices(args: argparse.Namespace) -> tuple[str, ...] | None:
    return None if args.devices is None else resolve_devices(args.devices)


def _add_fused_lora_flags(p: argparse.ArgumentParser, f: Flag) -> None:
    for expert in LORA_EXPERTS:
        p.add_argument(f"--lora-{expert}", type=Path, default=None, help=f"LoRA fused into the {expert}-noise expert")
        p.add_argument(f"--lora-{expert}-scale", type=float, default=None, help="its scale (default: 1.0)")


def _fused_loras(args: argparse.Namespace) -> tuple[dict, ...] | None:
    fused = []
    for expert, name in enumerate(LORA_EXPERTS):
        path, scale = getattr(args, f"lora_{name}"), getattr(args, f"lora_{name}_scale")
        if path is not None:
            fused.append({"path": path, "expert": expert} | ({} if scale is None else {"scale": scale}))
    return tuple(fused) or None


def _add_model_args(p: argparse.ArgumentParser, f: Flag) -> None:
    """`--model X` or a positional `MODEL` (as `vllm serve MODEL`): a directory or a Hugging Face id."""
    p.add_argument(f.name, dest=f.dest, default=None, metavar="MODEL", help=f.kwargs["help"])
    p.add_argument("model_positional", nargs="?", default=None, metavar="MODEL", help="the same as --model MODEL")


def _model(args: argparse.Namespace) -> str | None:
    flag, positional = args.model, args.model_positional
    if flag is not None and positional is not None and flag != positional:
        raise UserFacingError(f"the model is given twice ({positional} and --model {flag}); give it once")
    return flag or positional  # None: not given here (pydantic names --model when nothing else gives it)


ADAPTERS = {
    ("model_dir",): Adapter(_add_model_args, _model, label="--model"),
    ("workers", "devices"): Adapter(_add_devices_flag, _devices),
    ("lora", "fused"): Adapter(_add_fused_lora_flags, _fused_loras, label="--lora-high/--lora-low"),
}


def _add_config_flags(p: argparse.ArgumentParser, only=None, settings_file: bool = False) -> None:
    """The config tree's flags; with `settings_file`, each also read from `--config FILE` and the
    environment (serve/settings_file.py)."""
    first = len(p._actions)  # argument groups append to their parser's list of actions
    chosen = add_flags(p, ServerConfig, ADAPTERS, only)
    p.set_defaults(config_flags=chosen)
    if settings_file:
        env_names = {f.dest: f.env for f in chosen if f.env}
        p.set_defaults(settings=settings_options(p._actions[first:], env_names))
        p.add_argument(
            "--config",
            type=Path,
            default=None,
            metavar="FILE",
            help=f"a YAML file of settings, one per flag name without the dashes (port: 8000); env {CONFIG_ENV}. "
            "Precedence: command line > REELSERVE_* environment > this file > defaults",
        )


def server_config(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> ServerConfig:
    """The ServerConfig of the given flags (generate: the model and runner part, run in-process);
    for `serve`, with the settings of `--config FILE` and the environment where no flag was given."""
    if getattr(args, "settings", None) is None:
        return ServerConfig.model_validate(given_values(args, args.config_flags, ADAPTERS))
    layered = _layered_settings(args, os.environ if environ is None else environ)
    for warning in layered.warnings:
        print(f"reelserve {args.command}: warning: {warning}", file=sys.stderr)
    try:
        return ServerConfig.model_validate(given_values(layered.args, args.config_flags, ADAPTERS))
    except ValidationError as e:  # name the file key or variable a bad value came from, not its flag
        raise UserFacingError(_one_line(e, layered.sources)) from None


def _layered_settings(args: argparse.Namespace, environ: Mapping[str, str]) -> Layered:
    if getattr(args, "model_positional", None) is not None and args.model is None:
        args = argparse.Namespace(**{**vars(args), "model": args.model_positional})  # `serve MODEL` is a flag too
    file = args.config or (Path(environ[CONFIG_ENV]) if environ.get(CONFIG_ENV, "").strip() else None)
    return layer(args, args.settings, environ, file)


def quant_policy(text: str | None, skip: tuple[str, ...], model_dir: Path):
    """The `--quant` policy for the checkpoint's experts, or None; ValueError names a bad scheme or expert."""
    from models.wan.spec import read_spec
    from serve.quant.schemes import QuantPolicy

    if text is None:
        return None
    return QuantPolicy.parse(text, read_spec(model_dir).expert_names, tuple(skip))


# `quantize` takes the tree's quantization flags, the policy named `--scheme`.
QUANTIZE_ADAPTERS = {
    ("policy",): Adapter(
        lambda p, f: p.add_argument("--scheme", default=None, help=f.kwargs["help"]), lambda args: args.scheme
    )
}


def _add_quantize_flags(p: argparse.ArgumentParser) -> None:
    from serve.quant.config import QuantizationConfig

    p.set_defaults(quant_flags=add_flags(p, QuantizationConfig, QUANTIZE_ADAPTERS))


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reelserve", description="Serve Wan2.x video generation models.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the HTTP server")
    _add_config_flags(serve, settings_file=True)

    gen = sub.add_parser("generate", help="generate one video to a file")
    _add_config_flags(gen, GENERATE_FIELDS)
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
    gen.add_argument(
        "--image",
        type=Path,
        default=None,
        help="conditioning image (PNG/JPEG/WebP) for image-to-video models; cropped and resized to the size",
    )

    quantize = sub.add_parser("quantize", help="write a pre-quantized copy of a checkpoint")
    quantize.add_argument("in_dir", type=Path)
    quantize.add_argument("out_dir", type=Path)
    _add_quantize_flags(quantize)

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


def _params_from_args(args, spec, preset: str | None):
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
        preset=preset,
        **{k: v for k, v in fields.items() if v is not None},
    )
    values = fill_defaults(body, spec)
    for change in round_to_model(values, spec):
        print(f"note: {change} (multiples of {spec.spatial_multiple}, frames of the form 4k+1)", file=sys.stderr)
    return GenerationParams(**values)


def _image_from_args(args, params, spec, config):
    """The `--image` file as the API takes an upload: bounded, decoded, cropped and resized to the
    request's size. None without one; an error naming the file when the model disagrees."""
    from serve.api.images import ImageInputError, condition_image

    if args.image is None:
        if spec.image_input == "required":
            raise UserFacingError(f"{spec.model_dir} is an image-to-video model; pass --image FILE")
        return None
    if spec.image_input == "none":
        raise UserFacingError(f"{spec.model_dir} is a text-to-video model and takes no --image")
    try:
        image, adjustment = condition_image(args.image.read_bytes(), params.height, params.width, config.limits)
    except (OSError, ImageInputError) as e:
        raise UserFacingError(f"--image {args.image}: {e}") from e
    if adjustment:
        print(f"note: {adjustment}", file=sys.stderr)
    return image


class UserFacingError(Exception):
    """An error whose message already names the file and the fix; printed without a traceback."""


def cmd_generate(args) -> int:
    from tqdm import tqdm

    from models.registry import resolve
    from serve.engine.client import runner_config
    from serve.loader import CheckpointError
    from serve.pipeline.mp4 import encode_mp4
    from serve.sampling.presets import apply_preset
    from serve.worker.factory import load_model_runner

    config = server_config(args)
    spec = resolve(config.model_dir).spec
    params = apply_preset(_params_from_args(args, spec, config.sampling.preset))
    params = dataclasses.replace(params, image=_image_from_args(args, params, spec, config))
    # Plan memory for this request's own size, not the server's largest.
    limits = {"max_height": params.height, "max_width": params.width, "max_num_frames": params.num_frames}
    config = config.model_copy(update={"limits": config.limits.model_copy(update=limits)})
    try:
        runner = load_model_runner(
            str(config.model_dir), config.workers.device, config.workers.dtype, runner_config(config)
        )
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


def cmd_serve(args) -> int:
    from serve.api.server import ServerStartError, run_server

    config = server_config(args)
    try:
        run_server(config)
    except ServerStartError as e:
        raise UserFacingError(str(e)) from e
    return 0


def cmd_quantize(args) -> int:
    from serve.loader import CheckpointError
    from serve.quant.config import QuantizationConfig
    from serve.quant.convert import quantize_checkpoint

    quant = QuantizationConfig.model_validate(given_values(args, args.quant_flags, QUANTIZE_ADAPTERS))
    if quant.policy is None:
        raise UserFacingError("--scheme is required, e.g. --scheme w8a8-int8 or --scheme high=w8a8-int8,low=none")
    try:
        out = quantize_checkpoint(args.in_dir, args.out_dir, quant_policy(quant.policy, quant.skip, args.in_dir))
    except CheckpointError as e:
        raise UserFacingError(str(e)) from e
    print(f"wrote {out} ({quant.policy})")
    return 0


def _add_inspect_args(p: argparse.ArgumentParser) -> None:
    from models.inspect import add_inspect_args, add_memory_args

    add_inspect_args(p)
    add_memory_args(p)


def cmd_inspect(args) -> int:
    from models.inspect import run_inspect
    from serve.loader import CheckpointError

    try:
        return run_inspect(args)
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


def _one_line(e: Exception, sources: Mapping[str, str] | None = None) -> str:
    """pydantic's ValidationError lists each bad field over several lines with a docs URL; keep
    just the field (as its flag, or the file key or variable `sources` says it came from) and the
    message, which already says the fix."""
    errors = getattr(e, "errors", None)
    if not callable(errors):
        return str(e)
    parts = []
    for err in errors():
        label = _flag_of(err["loc"], getattr(e, "title", ""))
        label = (sources or {}).get(label, label)
        message = err["msg"].removeprefix("Value error, ")
        parts.append(f"{label}: {message}" if label and not message.startswith(label) else message)
    return "; ".join(parts)


def _flag_of(loc: tuple, model: str) -> str | None:
    """The flag of the field an error is about: from the tree for ServerConfig; for other models
    (a request, a sub-config alone), the field's name as a flag; None for a check across fields."""
    if model == ServerConfig.__name__:
        return flag_label(loc, ServerConfig, ADAPTERS)
    field = ".".join(str(x) for x in loc)
    return f"--{field.replace('_', '-')}" if field else None


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
