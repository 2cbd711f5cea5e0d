"""Few-step preset against the default sampling on the same checkpoint and size.

Runs, alternating so machine noise hits both alike, the checkpoint's default (40 UniPC steps with
CFG: cond and uncond in one forward) and `--preset lightning-4step` (4 Euler steps, no CFG), and
prints the median wall time of each and their ratio, end to end and for the denoise stage alone.
Expect a denoise ratio near 4 / 40 = 0.1 in forwards, less in FLOPs (no uncond rows: 0.05),
plus whatever text encode and VAE decode add to both.

    python bench/fewstep.py                    # builds the 'bench' tiny checkpoint (~300 MB)
    python bench/fewstep.py --model DIR --runs 3 --height 96 --width 96 --frames 9
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from models.tiny import checkpoint_or_tiny
from serve.engine.request import GenerationParams
from serve.sampling.presets import apply_preset
from serve.worker.model_runner import ModelRunner


def params(args, preset: str | None) -> GenerationParams:
    return apply_preset(GenerationParams(
        prompt="a red square moving left over the sea",
        negative_prompt="blurry, static",
        height=args.height,
        width=args.width,
        num_frames=args.frames,
        fps=16,
        num_inference_steps=args.steps,
        guidance_scale=4.0,
        guidance_scale_2=3.0,
        seed=0,
        preset=preset,
    ))  # fmt: skip


def report(args, model: Path) -> None:
    runner = ModelRunner.from_checkpoint(model)
    modes = {"default": params(args, None), args.preset: params(args, args.preset)}
    times: dict[str, list[dict[str, float]]] = {name: [] for name in modes}
    for p in modes.values():
        runner.generate(p)  # warm-up: first-call allocations
    for _ in range(args.runs):
        for name, p in modes.items():
            out = runner.generate(p)
            times[name].append(out.timings | {"total": sum(out.timings.values())})
    print(f"checkpoint {model}, {args.width}x{args.height}, {args.frames} frames, median of {args.runs} runs")
    print(f"default: {args.steps} UniPC steps, CFG 4.0/3.0;  {args.preset}: 4 Euler steps, no CFG")
    for stage in ("denoise", "total"):
        a, b = (statistics.median(t[stage] for t in times[name]) for name in modes)
        print(f"{stage:8s} default {a:8.3f}s   {args.preset} {b:8.3f}s   ratio {b / a:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="checkpoint dir (default: build 'bench' size)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40, help="steps of the default run")
    parser.add_argument("--preset", default="lightning-4step")
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--frames", type=int, default=9)
    args = parser.parse_args()
    with checkpoint_or_tiny(args.model, size="bench") as model:
        report(args, model)


if __name__ == "__main__":
    main()
