"""`reelserve inspect DIR`: parameters, bytes per dtype and memory per residency mode, from headers only.

The numbers come from the planner's memory model (`serve.loader.memory_model`: what each component
holds per weight dtype, and the activation estimate per CFG mode and block chunks) and its candidates
(`serve.loader.planner`: residency modes, each with the first activation level that fits);
this module prints them, and writes header-only fixtures of the real Wan2.2 checkpoints for the
tests and the README table.
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from serve.cli_flags import add_flags, flags, given_values
from serve.loader.config import MemoryConfig
from serve.loader.memory_model import GB, GIB, WEIGHT_DTYPES, ModelStats, model_stats

# ---- header-only fixtures of the real checkpoints (tests and the README table) -------------------

A14B = dict(
    patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)  # fmt: skip
TI2V_5B = {**A14B, "num_attention_heads": 24, "ffn_dim": 14336, "num_layers": 30, "in_channels": 48, "out_channels": 48}
UMT5_XXL = dict(
    architectures=["UMT5EncoderModel"], vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
    num_heads=64, relative_attention_num_buckets=32, relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu", model_type="umt5",
)  # fmt: skip
VAE_21 = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])
VAE_22 = dict(
    base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, in_channels=12, out_channels=12, patch_size=2,
    scale_factor_spatial=16, scale_factor_temporal=4, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
    temperal_downsample=[False, True, True],
)  # fmt: skip
REFERENCE_MODELS = {
    "Wan2.2-T2V-A14B": (A14B, 2, VAE_21, {"boundary_ratio": 0.875}),
    "Wan2.2-TI2V-5B": (TI2V_5B, 1, VAE_22, {"expand_timesteps": True}),
}
# The size each model card generates at: what the README table plans for.
REFERENCE_SIZES = [
    ("Wan2.2-T2V-A14B", (720, 1280, 81)),
    ("Wan2.2-T2V-A14B", (480, 832, 81)),
    ("Wan2.2-TI2V-5B", (704, 1280, 121)),
]


def write_header_fixture(out_dir: str | Path, model: str) -> Path:
    """A checkpoint folder with the real configs and safetensors files whose headers declare the real
    shapes; the data area is a sparse hole (`truncate`), so a 28 GB expert costs a few KB of disk."""
    transformer, n_experts, vae, extra = REFERENCE_MODELS[model]
    root = Path(out_dir)
    parts = {
        "text_encoder": ("transformers", UMT5_XXL),
        "vae": ("diffusers", {"_class_name": "AutoencoderKLWan", **vae}),
    }
    for name in ("transformer", "transformer_2")[:n_experts]:
        parts[name] = ("diffusers", {"_class_name": "WanTransformer3DModel", **transformer})
    for name, (library, config) in parts.items():
        _write_component(root / name, library, config)
    index = {name: [lib, "X"] for name, (lib, _) in parts.items()}
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", **index, **extra}))
    return root


def _write_component(folder: Path, library: str, config: dict) -> None:
    from serve.loader.build import build_empty, read_component_config
    from serve.loader.load import module_slots

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    component, cfg = read_component_config(folder)
    module = build_empty(component, cfg)
    header, offset = {}, 0
    for slot in dict.fromkeys(module_slots(module).values()):
        nbytes = math.prod(slot.shape) * 4
        header[slot.names[0]] = {"dtype": "F32", "shape": list(slot.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    name = "diffusion_pytorch_model.safetensors" if library == "diffusers" else "model.safetensors"
    raw = json.dumps(header).encode()
    with (folder / name).open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)


# ---- output ----------------------------------------------------------------------------------------


def _fmt(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f} GiB"


def report_rows(stats: ModelStats) -> list[list[str]]:
    rows = []
    for c in [*stats.experts, stats.text_encoder, stats.vae]:
        disk = ", ".join(f"{k} {_fmt(v)}" for k, v in sorted(c.disk_bytes.items()))
        held = " / ".join(_fmt(c.held[w]) for w in WEIGHT_DTYPES)
        rows.append([c.name, f"{c.params:,}", disk, held])
    return rows


def activation_table(stats: ModelStats, size: tuple[int, int, int], levels) -> dict[str, int]:
    """Denoising activation bytes per (CFG mode, block chunks) level, keyed like `batched/1`."""
    rows = {"batched": 2, "sequential": 1}
    return {f"{cfg}/{chunks}": stats.activation_bytes(*size, rows[cfg], chunks) for cfg, chunks in levels}


def print_report(stats: ModelStats, plans: list, size: tuple[int, int, int], levels) -> None:
    table = [["component", "params", "on disk", "held bf16 / fp8 / int8"], *report_rows(stats)]
    _print_table(table)
    h, w, f = size
    denoise = ", ".join(f"{key} {_fmt(n)}" for key, n in activation_table(stats, size, levels).items())
    print(
        f"\nactivations at {w}x{h}, {f} frames: {stats.tokens(h, w, f):,} latent tokens; denoise by CFG mode / "
        f"block chunks: {denoise}; VAE decode {_fmt(stats.vae_decode_bytes(h, w))}\n"
    )
    rows = [["mode", "weights", "text encoder", "source", "CFG", "chunks", "device peak", "host", "fits"]]
    for p in _first_fitting_level(plans):
        fit = "yes" if p.fits else "no"
        rows.append([
            p.mode, p.weights_dtype, p.text_encoder, p.offload_source, p.cfg_mode, str(p.block_chunks),
            _fmt(p.device), _fmt(p.host), fit,
        ])  # fmt: skip
    _print_table(rows)
    print_groups(stats, size)


GROUP_SIZES = (1, 2, 4, 8)


def group_rows(stats: ModelStats, size: tuple[int, int, int]) -> list[dict]:
    """What a worker group of 1/2/4/8 devices changes per device: every rank holds the whole model
    (weights unchanged), Ulysses divides the sequence's activations by its degree, and CFG-parallel
    (cfg=2) runs one of the two CFG rows per rank. CFG batched, whole blocks; bf16 weights, resident."""
    weights = sum(e.held["bf16"] for e in stats.experts) + stats.text_encoder.held["bf16"] + stats.vae.held["bf16"]
    tokens = stats.tokens(*size)
    rows = []
    for devices in GROUP_SIZES:
        for cfg in (1, 2):
            if devices % cfg:
                continue
            ulysses = devices // cfg
            rows.append({
                "devices": devices, "ulysses": ulysses, "cfg": cfg, "tokens_per_device": -(-tokens // ulysses),
                "activation_bytes": stats.activation_bytes(*size, 2 // cfg, 1, ulysses), "weights_bytes": weights,
            })  # fmt: skip
    return rows


def print_groups(stats: ModelStats, size: tuple[int, int, int]) -> None:
    h, w, f = size
    print(f"\nper device in a worker group (--parallel ulysses=U,cfg=C) at {w}x{h}, {f} frames, resident bf16:")
    table = [["devices", "ulysses", "cfg", "tokens/device", "denoise activations", "weights"]]
    for r in group_rows(stats, size):
        table.append([
            str(r["devices"]), str(r["ulysses"]), str(r["cfg"]), f"{r['tokens_per_device']:,}",
            _fmt(r["activation_bytes"]), _fmt(r["weights_bytes"]),
        ])  # fmt: skip
    _print_table(table)


def groups_table() -> str:
    """The README's table: A14B at 480p and 720p, per device, for groups of 1/2/4/8 devices."""
    lines = ["| size | devices | ulysses x cfg | tokens per device | denoise activations | weights |", "|---" * 6 + "|"]
    with tempfile.TemporaryDirectory() as tmp:
        stats = model_stats(write_header_fixture(Path(tmp) / "a14b", "Wan2.2-T2V-A14B"))
        for _, size in [s for s in REFERENCE_SIZES if s[0] == "Wan2.2-T2V-A14B"][::-1]:
            h, w, f = size
            for r in group_rows(stats, size):
                lines.append(
                    f"| {w}x{h}x{f} | {r['devices']} | {r['ulysses']} x {r['cfg']} | {r['tokens_per_device']:,} | "
                    f"{_fmt(r['activation_bytes'])} | {_fmt(r['weights_bytes'])} |"
                )
    return "\n".join(lines)


def _first_fitting_level(plans: list) -> list:
    """One row per residency configuration: its first activation level that fits, else its smallest."""
    by_config: dict[tuple, list] = {}
    for p in plans:
        by_config.setdefault((p.weights_dtype, p.mode, p.offload_source, p.text_encoder), []).append(p)
    return [next((p for p in group if p.fits), group[-1]) for group in by_config.values()]


def _print_table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(r, widths, strict=True)).rstrip())


def readme_table(prefetch_blocks: int = 1) -> str:
    """Planner choices for the reference models on common cards (computed from headers, not measured)."""
    from serve.loader.planner import Budget, plan

    lines = [
        "| model | size | host RAM | " + " | ".join(f"{v} GB" for v in (8, 12, 16, 24, 48, 80)) + " |",
        "|---|---|---|" + "---|" * 6,
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for model, size in REFERENCE_SIZES:
            if not (Path(tmp) / model).is_dir():
                write_header_fixture(Path(tmp) / model, model)
            stats = model_stats(Path(tmp) / model)
            for ram in (32, 64):
                cells = []
                for vram in (8, 12, 16, 24, 48, 80):
                    choice = [
                        plan(stats, Budget(vram * GB, ram * GB), size, w, prefetch_blocks) for w in ("bf16", "fp8")
                    ]
                    cells.append(" / ".join(c.short() if c else "none" for c in choice))
                h, w, f = size
                lines.append(f"| {model} | {w}x{h}x{f} | {ram} GB | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reelserve inspect", description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", nargs="?", type=Path)
    parser.add_argument("--table", action="store_true", help="print the README table for the reference models")
    parser.add_argument("--groups-table", action="store_true", help="print the README table of worker groups for A14B")
    add_inspect_args(parser)
    add_memory_args(parser)
    args = parser.parse_args(argv)
    if args.table:
        print(readme_table(memory_config(args).prefetch_blocks))
        return 0
    if args.groups_table:
        print(groups_table())
        return 0
    if args.model_dir is None:
        parser.error("give a checkpoint directory (or --table)")
    return run_inspect(args)


def add_inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--height", type=int, default=720)
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--num-frames", type=int, default=81)
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run_inspect(args) -> int:
    from serve.loader.planner import activation_levels, candidates, measure_budget

    memory = memory_config(args)
    stats = model_stats(args.model_dir)
    size = (args.height, args.width, args.num_frames)
    budget = measure_budget(memory.vram, memory.ram, measure=False)
    levels = activation_levels(memory.cfg_mode, memory.block_chunks)
    plans = candidates(stats, budget, size, memory.prefetch_blocks, levels=levels)
    if args.json:
        out = {"model": asdict(stats), "tokens": stats.tokens(*size), "plans": [asdict(p) for p in plans]}
        out["activation_bytes"] = activation_table(stats, size, levels)
        out["vae_decode_bytes"] = stats.vae_decode_bytes(args.height, args.width)
        out["groups"] = group_rows(stats, size)
        for c in out["model"]["experts"] + [out["model"]["text_encoder"], out["model"]["vae"]]:
            c.pop("config")
        print(json.dumps(out, indent=2))
    else:
        print_report(stats, plans, size, levels)
    return 0


def add_memory_args(p: argparse.ArgumentParser) -> None:
    """The memory flags of `inspect`, generated from `MemoryConfig` as `serve` and `generate` generate
    theirs (torch-free: the CLI builds its parser before it knows which command runs)."""
    add_flags(p, MemoryConfig)


def memory_config(args: argparse.Namespace) -> MemoryConfig:
    """The memory flags given to `inspect` (a bad `--vram` fails here, naming the flag)."""
    return MemoryConfig.model_validate(given_values(args, list(flags(MemoryConfig))))


if __name__ == "__main__":
    sys.exit(main())
