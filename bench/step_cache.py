"""First-block cache: skip rate, speed and PSNR against the uncached output for a few thresholds.

Same checkpoint, prompt, seed and size for every threshold; PSNR is over the decoded float
frames in [0, 1] against the uncached run (threshold 0 must print inf: it never skips).
On the random-weight tiny checkpoints the numbers only show the mechanism; the quality
trade-off has to be measured on real weights.

    python bench/step_cache.py                   # 'bench' tiny checkpoint, 40 UniPC steps with CFG
    python bench/step_cache.py --model DIR --preset lightning-4step --thresholds 0 0.1 0.3
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from models.tiny import checkpoint_or_tiny
from serve.engine.request import GenerationParams
from serve.sampling.presets import apply_preset
from serve.worker.model_runner import ModelRunner


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def report(args, model: Path) -> None:
    runner = ModelRunner.from_checkpoint(model)
    p = apply_preset(GenerationParams(
        "a red square moving left over the sea", "blurry, static", args.height, args.width, args.frames, 16,
        args.steps, 4.0, 3.0, seed=0, preset=args.preset,
    ))  # fmt: skip
    runner.decode_float(p)  # warm-up
    start = time.perf_counter()
    reference = runner.decode_float(p)
    base_s = time.perf_counter() - start
    print(f"checkpoint {model}, {args.width}x{args.height}, {args.frames} frames, preset {args.preset}")
    print(f"uncached: {base_s:.3f}s")
    for threshold in args.thresholds:
        runner.step_cache_threshold = threshold
        (state,) = runner.start([p])
        start = time.perf_counter()
        runner._run_steps(state, None)
        frames = runner.decode(state.latents)
        seconds = time.perf_counter() - start
        cache = state.step_cache
        rate = cache.skipped / (cache.skipped + cache.computed)
        print(
            f"threshold {threshold:<5g} skipped {cache.skipped:3d}/{cache.skipped + cache.computed:<3d} "
            f"({rate:5.1%})  {seconds:7.3f}s  PSNR {psnr(frames, reference):6.2f} dB"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="checkpoint dir (default: build 'bench' size)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--preset", default=None)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.0, 0.02, 0.05, 0.1, 0.2])
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--frames", type=int, default=9)
    args = parser.parse_args()
    with checkpoint_or_tiny(args.model, size="bench") as model:
        report(args, model)


if __name__ == "__main__":
    main()
