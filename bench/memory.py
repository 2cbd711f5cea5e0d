"""Peak device bytes (ledger) and step time of each residency mode, as ratios to `resident`.

    python bench/memory.py [--dir /tmp/wan-bench] [--steps 4]

On a CPU "transfers" are memory copies, so step-time ratios show the bookkeeping and copy cost,
not PCIe; the peak-bytes ratios are what a GPU would hold (the ledger counts real tensors).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from models.tiny import write_tiny_checkpoint
from serve.engine.request import GenerationParams
from serve.loader.residency import ResidencyConfig
from serve.worker.model_runner import ModelRunner

MODES = {
    "resident": ResidencyConfig("resident"),
    "expert-swap": ResidencyConfig("expert-swap"),
    "expert-swap(disk)": ResidencyConfig("expert-swap", offload_source="disk"),
    "block-offload k=1": ResidencyConfig("block-offload", 1),
    "block-offload k=0, TE cpu": ResidencyConfig("block-offload", 0, text_encoder="cpu"),
}


def measure(model_dir: Path, config: ResidencyConfig, steps: int) -> tuple[int, float]:
    runner = ModelRunner.from_checkpoint(model_dir, residency=config)
    params = GenerationParams("a red cat", "", 64, 64, 9, 16, steps, 4.0, 3.0, seed=0)
    (state,) = runner.start([params])
    experts = runner.experts_of(state)
    runner.residency.ledger.reset_peak()
    start = time.perf_counter()
    while state.step < len(experts):
        runner.denoise_step([state], experts[state.step])
    seconds = (time.perf_counter() - start) / len(experts)
    runner.residency.close()
    return runner.residency.ledger.peak, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/reelserve-bench-ckpt"))
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    if not (args.dir / "model_index.json").is_file():
        write_tiny_checkpoint(args.dir, size="bench")
    results = {name: measure(args.dir, config, args.steps) for name, config in MODES.items()}
    base_peak, base_step = results["resident"]
    print(f"{'mode':28} {'peak MB':>9} {'peak/res':>9} {'step s':>8} {'step/res':>9}")
    for name, (peak, step) in results.items():
        print(f"{name:28} {peak / 1e6:9.1f} {peak / base_peak:9.2f} {step:8.3f} {step / base_step:9.2f}")


if __name__ == "__main__":
    main()
