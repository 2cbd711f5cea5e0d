"""Load time of reelserve's loader modes against diffusers' `WanPipeline.from_pretrained`, in one run.

Every load runs in a fresh subprocess that has already imported everything either loader needs, so
the figure is the load, not Python's imports. Rounds interleave the loaders (a machine shared with
other work slows them alike) and the medians are compared. Two times per load:

- `load`: until the call returns. diffusers and reelserve's zero-copy mode both leave fp32 weights as
  views of the files' mappings, so little is read by then;
- `+ touch`: load, then one read of every weight (a sum per tensor), so lazily mapped pages are paid
  for; this is the figure to compare for a first request's latency.

Warm: the files are read once up front, so every loader finds them in the page cache. Cold (`--cold`):
before each load the checkpoint's pages are dropped from the page cache with
`posix_fadvise(POSIX_FADV_DONTNEED)` on its files (which needs no privilege and leaves other processes'
cache alone; `/proc/sys/vm/drop_caches` would flush the whole machine), and GB/s = checkpoint bytes /
(`+ touch` time).

    python bench/load.py                        # builds the 'bench' checkpoint (~330 MB) in a temp dir
    python bench/load.py --model /tmp/bench_ckpt --rounds 7 --cold
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Loader options per reelserve mode, set in its own subprocess (see `_set_loader_defaults`).
MODES: dict[str, dict] = {
    "reelserve serial copy (old)": dict(readers=1, zero_copy=False),
    "reelserve parallel copy": dict(zero_copy=False),
    "reelserve default (parallel, zero-copy)": {},
}
DIFFUSERS = "diffusers from_pretrained"


def _import_everything() -> None:
    """Everything either loader imports, including what each imports on its first call (found by
    comparing `sys.modules` before and after a load): reelserve's loader and quantizer, diffusers'
    guiders and the schedulers it lists as compatible with UniPC, T5's tokenizer for both."""
    import diffusers  # noqa: F401
    import diffusers.guiders  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import transformers.models.mt5  # noqa: F401
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel  # noqa: F401
    from transformers import AutoTokenizer, UMT5EncoderModel  # noqa: F401
    from transformers.models.t5 import tokenization_t5  # noqa: F401

    import models.wan.t2v  # noqa: F401
    import serve.loader.load  # noqa: F401
    import serve.quant.loading  # noqa: F401
    import serve.worker.model_runner  # noqa: F401

    UniPCMultistepScheduler().compatibles  # noqa: B018  (imports each compatible scheduler's module)


def _set_loader_defaults(options: dict) -> None:
    """Make `options` the keyword defaults of `load_component` in this process: the model's own
    component loader (models/wan/components.py) then uses them without a flag for each."""
    from serve.loader import load as loader

    loader.load_component.__kwdefaults__ = {**loader.load_component.__kwdefaults__, **options}


def _load(which: str, model: Path) -> list:
    """The loaded modules of `which`."""
    if which == DIFFUSERS:
        import torch
        from diffusers import WanPipeline

        pipe = WanPipeline.from_pretrained(model, dtype=torch.float32)
        return [pipe.text_encoder, pipe.vae, pipe.transformer, pipe.transformer_2]
    from serve.worker.model_runner import ModelRunner

    _set_loader_defaults(MODES[which])
    runner = ModelRunner.from_checkpoint(model)
    return [runner.text_encode.text_encoder, runner.model.vae, *runner.denoise.experts]


def _touch(modules: list) -> None:
    import torch

    with torch.inference_mode():
        for module in modules:
            for tensor in (*module.parameters(), *module.buffers()):
                if tensor.numel():
                    tensor.float().sum().item()


def child(which: str, model: Path) -> dict:
    _import_everything()
    start = time.perf_counter()
    modules = _load(which, model)
    loaded = time.perf_counter() - start
    _touch(modules)
    return {"load": loaded, "touch": time.perf_counter() - start}


def measure(which: str, model: Path) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", which, "--model", str(model)], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def weight_files(model: Path) -> list[Path]:
    return sorted(model.rglob("*.safetensors"))


def warm(model: Path) -> None:
    for path in weight_files(model):
        path.read_bytes()


def evict(model: Path) -> None:
    """Drop the checkpoint's pages from the page cache (clean pages: the next read goes to the disk)."""
    for path in weight_files(model):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run(model: Path, rounds: int, cold: bool) -> dict[str, dict[str, float]]:
    names = [DIFFUSERS, *MODES]
    times: dict[str, list[dict]] = {name: [] for name in names}
    warm(model)
    for _ in range(rounds):
        for name in names:
            if cold:
                evict(model)
            times[name].append(measure(name, model))
    return {n: {k: statistics.median(t[k] for t in runs) for k in ("load", "touch")} for n, runs in times.items()}


def report(results: dict[str, dict[str, float]], nbytes: int, cold: bool) -> None:
    base = results[DIFFUSERS]
    print(f"{'loader':42s} {'load s':>8s} {'x diff':>7s} {'+touch s':>9s} {'x diff':>7s}" + (" GB/s" if cold else ""))
    for name, r in results.items():
        rate = f" {nbytes / r['touch'] / 1e9:5.2f}" if cold else ""
        print(
            f"{name:42s} {r['load']:8.3f} {r['load'] / base['load']:7.2f} {r['touch']:9.3f} "
            f"{r['touch'] / base['touch']:7.2f}{rate}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a checkpoint directory (default: build the bench size)")
    parser.add_argument("--rounds", type=int, default=5, help="loads per loader; medians are reported")
    parser.add_argument("--cold", action="store_true", help="also measure from a cold page cache")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model)))
        return
    from models.tiny import checkpoint_or_tiny

    with checkpoint_or_tiny(args.model, "bench") as model:
        nbytes = sum(p.stat().st_size for p in weight_files(model))
        print(f"{model}: {nbytes / 1e6:.0f} MB of safetensors, {os.cpu_count()} CPUs, {args.rounds} rounds, medians")
        print("warm page cache:")
        report(run(model, args.rounds, cold=False), nbytes, cold=False)
        if args.cold:
            print("cold page cache (posix_fadvise DONTNEED on the checkpoint's files before each load):")
            report(run(model, args.rounds, cold=True), nbytes, cold=True)


if __name__ == "__main__":
    main()
