"""reelserve vs diffusers' WanPipeline on the same checkpoint and request, in one run.

Prints, side by side with ratios:
- median end-to-end latency (prompt -> decoded frames) over N runs, after one warm-up each;
- load time and peak RSS rise of each loader, each measured in a fresh subprocess (so neither
  benefits from the other's page cache of imports or allocator state; file pages of the
  checkpoint are warm for both after the first read, which the script does up front).

    python bench/e2e_vs_diffusers.py                    # builds the 'bench' tiny checkpoint
    python bench/e2e_vs_diffusers.py --model DIR --runs 5 --steps 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from models.tiny import checkpoint_or_tiny


class PeakRss:
    """Samples this process's RSS every millisecond in a thread; reports the peak rise."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.base = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.001)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def rise(self) -> int:
        return self.peak - self.base


def load_reelserve(model: Path):
    from serve.worker.model_runner import ModelRunner

    return ModelRunner.from_checkpoint(model)


def load_diffusers(model: Path):
    import torch
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(model, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def child_load(which: str, model: Path) -> None:
    """Run in a subprocess: import everything first, then time and measure one load."""
    import diffusers  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import serve.worker.model_runner  # noqa: F401

    loader = load_reelserve if which == "reelserve" else load_diffusers
    start = time.perf_counter()
    with PeakRss() as rss:
        loader(model)
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_rise": rss.rise}))


def measure_load(which: str, model: Path) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child-load", which, "--model", str(model)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def request(args):
    from serve.engine.request import GenerationParams

    return GenerationParams(
        prompt="a red square moving left",
        negative_prompt="",
        height=args.height,
        width=args.width,
        num_frames=args.frames,
        fps=16,
        num_inference_steps=args.steps,
        guidance_scale=4.0,
        guidance_scale_2=3.0,
        seed=0,
        sampler="unipc",
    )


def median_latency(fn, runs: int) -> float:
    fn()  # warm-up: first-call allocations and lazy inits are not steady-state latency
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compare_latency(args, model: Path) -> tuple[float, float]:
    import torch

    p = request(args)
    runner, pipe = load_reelserve(model), load_diffusers(model)

    def ours():
        runner.generate(p)

    def theirs():
        pipe(
            p.prompt,
            negative_prompt=p.negative_prompt,
            height=p.height,
            width=p.width,
            num_frames=p.num_frames,
            num_inference_steps=p.num_inference_steps,
            guidance_scale=p.guidance_scale,
            guidance_scale_2=p.guidance_scale_2,
            generator=torch.Generator("cpu").manual_seed(p.seed),
            output_type="np",
        )

    return median_latency(ours, args.runs), median_latency(theirs, args.runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="checkpoint dir (default: build 'bench' size)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--child-load", choices=("reelserve", "diffusers"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_load:
        child_load(args.child_load, args.model)
        return
    with checkpoint_or_tiny(args.model, size="bench") as model:
        report(args, model)


def report(args, model: Path) -> None:
    for f in model.rglob("*.safetensors"):  # warm the page cache so neither loader pays the first read
        f.read_bytes()
    loads = {name: measure_load(name, model) for name in ("reelserve", "diffusers")}
    ours, theirs = compare_latency(args, model)
    r, d = loads["reelserve"], loads["diffusers"]
    print(f"checkpoint: {model}  request: {args.width}x{args.height}, {args.frames} frames, {args.steps} steps, CFG")
    print(f"{'':24}{'reelserve':>12}{'diffusers':>12}{'ratio':>8}")
    print(f"{'median latency (s)':24}{ours:12.3f}{theirs:12.3f}{ours / theirs:8.2f}")
    print(f"{'load time (s)':24}{r['seconds']:12.3f}{d['seconds']:12.3f}{r['seconds'] / d['seconds']:8.2f}")
    rr, dr = r["peak_rss_rise"] / 2**20, d["peak_rss_rise"] / 2**20
    print(f"{'load peak RSS rise (MiB)':24}{rr:12.1f}{dr:12.1f}{rr / dr:8.2f}")


if __name__ == "__main__":
    main()
