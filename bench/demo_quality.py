"""Task accuracy of the demo model (colour and motion direction read back from the decoded frames),
for the default sampling and for each optimisation, with PSNR against the default beside it.

    python bench/demo_quality.py                                  # default only, seeds 0 1
    python bench/demo_quality.py --configs all --seeds 0          # + quant schemes, presets, step cache
    python bench/demo_quality.py --model DIR --configs default,int8-wo,cache-0.1

Every configuration runs the same prompts (all trained and held-out combinations) and seeds in one
process; PSNR is over uint8 frames against the default configuration's video for the same
prompt and seed (so "default" has none). Seconds are the median wall time per video on this
machine, text encode to uint8 frames.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.demo.quality import Generate, evaluate_splits, format_scores, runner_generate  # noqa: E402
from serve.quant import SCHEMES, QuantPolicy  # noqa: E402
from serve.worker.model_runner import ModelRunner  # noqa: E402

DEMO_MODEL = Path(__file__).resolve().parents[1] / "models" / "demo" / "checkpoint"
QUANT_SCHEMES = tuple(SCHEMES)
PRESETS = ("lightning-4step",)
CACHE_THRESHOLDS = (0.05, 0.1, 0.2)


def all_configs() -> list[str]:
    return (
        ["default"]
        + list(QUANT_SCHEMES)
        + [f"preset-{p}" for p in PRESETS]
        + [f"cache-{t}" for t in CACHE_THRESHOLDS]
        + ["steps-8", "euler"]
    )


def build(model: Path, config: str) -> tuple[ModelRunner, dict]:
    """The runner and request overrides a configuration name stands for."""
    if config in QUANT_SCHEMES:
        from models.wan.spec import read_spec

        policy = QuantPolicy.parse(config, read_spec(model).expert_names, ())
        return ModelRunner.from_checkpoint(model, quant=policy), {}
    if config.startswith("cache-"):
        return ModelRunner.from_checkpoint(model, step_cache_threshold=float(config[6:])), {}
    runner = ModelRunner.from_checkpoint(model)
    if config.startswith("preset-"):
        return runner, {"preset": config[7:]}
    if config.startswith("steps-"):
        return runner, {"num_inference_steps": int(config[6:])}
    if config == "euler":
        return runner, {"sampler": "euler"}
    if config == "default":
        return runner, {}
    raise SystemExit(f"--configs: unknown configuration {config!r}; choose from {','.join(all_configs())}")


def recording(generate: Generate, store: dict) -> Generate:
    def wrapped(prompt: str, seed: int) -> np.ndarray:
        store[prompt, seed] = frames = generate(prompt, seed)
        return frames

    return wrapped


def psnr_uint8(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=DEMO_MODEL)
    ap.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    ap.add_argument("--configs", default="default", help=f"comma-separated, or 'all': {','.join(all_configs())}")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    seeds = [int(s) for s in args.seeds.split(",")]
    configs = all_configs() if args.configs == "all" else args.configs.split(",")
    unknown = [c for c in configs if c not in all_configs() and not c.startswith(("cache-", "steps-", "preset-"))]
    if unknown:
        ap.error(f"--configs: unknown {unknown}; choose from {','.join(all_configs())} (or cache-T, steps-N, preset-P)")
    # The default runs first: every other configuration's PSNR is measured against its videos.
    configs = ["default"] + [c for c in configs if c != "default"]
    print(f"model {args.model}, seeds {seeds}")
    reference: dict = {}
    summary = []
    for config in configs:
        runner, overrides = build(args.model, config)
        frames: dict = {}
        generate = recording(runner_generate(runner, **overrides), frames)
        generate("a white disc moving down", 12345)  # warm-up: first-call allocations
        frames.clear()
        scores = evaluate_splits(generate, seeds)
        if config == "default":
            reference = frames
            psnr = float("nan")
        else:
            psnr = statistics.median(psnr_uint8(frames[k], reference[k]) for k in frames)
        print(f"\n== {config}" + ("" if config == "default" else f"  (median PSNR vs default {psnr:.1f} dB)"))
        print(format_scores(scores))
        summary.append((config, scores, psnr))
    if len(summary) > 1:
        print(f"\n{'config':<22}{'colour':>8}{'direction':>10}{'held-out c/d':>14}{'PSNR dB':>9}{'s/video':>9}")
        for config, scores, psnr in summary:
            t, h = scores["trained"], scores["held-out"]
            print(
                f"{config:<22}{t.colour_accuracy:>8.1%}{t.direction_accuracy:>10.1%}"
                f"{h.colour_accuracy:>7.0%}/{h.direction_accuracy:<6.0%}{psnr:>9.1f}{t.median_seconds:>9.2f}"
            )


if __name__ == "__main__":
    main()
