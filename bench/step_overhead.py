"""Engine overhead per denoising step: a request's step through the whole engine (engine loop,
scheduler, pipe to the worker process, the runner's batching, CFG combine, sampler update) vs the
bare transformer forward on the same inputs (the CFG pair as one batch of two rows), in one run.

    reelserve tiny --size bench /tmp/bench-ckpt         # ~300 MB, random weights
    python bench/step_overhead.py --model /tmp/bench-ckpt

The engine's time per step is the difference of two requests' wall times, with `--steps` and with
`--steps + --extra-steps` steps, divided by the extra steps: text encoding, decoding and MP4 cancel
out, what remains is what one more step costs a client, gaps between steps included. The worker's
own time per step (the `denoise` stage it reports) splits that into the runner's share and the
engine loop + IPC share. Engine pairs and bare forwards alternate, so load from other processes
on the machine hits both alike; medians over `--repeats`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from models.tiny import checkpoint_or_tiny
from models.wan.spec import read_spec
from serve.config import ServerConfig
from serve.engine.client import EngineClient
from serve.engine.request import GenerationParams
from serve.pipeline.text_encode import MAX_SEQUENCE_LENGTH


def params(args, steps: int, seed: int) -> GenerationParams:
    return GenerationParams(
        prompt="a red square moving left",
        negative_prompt="",
        height=args.size,
        width=args.size,
        num_frames=args.frames,
        fps=16,
        num_inference_steps=steps,
        guidance_scale=4.0,
        guidance_scale_2=3.0,
        seed=seed,
    )


def engine_step(client: EngineClient, args, repeat: int) -> tuple[float, float]:
    """(wall seconds per extra step, worker-reported denoise seconds per extra step)."""
    walls, denoise = [], []
    for steps in (args.steps, args.steps + args.extra_steps):
        start = time.perf_counter()
        result = client.enqueue(params(args, steps, seed=repeat)).result(timeout=1800)
        walls.append(time.perf_counter() - start)
        denoise.append(result.timings["denoise"])
        result.store.delete(result.artifact)
    return (walls[1] - walls[0]) / args.extra_steps, (denoise[1] - denoise[0]) / args.extra_steps


class BareForward:
    """The high-noise expert as diffusers loads it, on inputs of the request's shape."""

    def __init__(self, model: Path, args) -> None:
        from diffusers import WanTransformer3DModel

        self.transformer = WanTransformer3DModel.from_pretrained(model / "transformer", dtype=torch.float32).eval()
        spec = read_spec(model)
        channels, frames, height, width = spec.latent_shape(args.size, args.size, args.frames)[1:]
        generator = torch.Generator().manual_seed(0)
        self.hidden = torch.randn(2, channels, frames, height, width, generator=generator)
        self.timestep = torch.full((2,), 999.0)
        text_dim = self.transformer.config.text_dim
        self.embeds = torch.randn(2, MAX_SEQUENCE_LENGTH, text_dim, generator=generator)

    @torch.inference_mode()
    def __call__(self) -> float:
        start = time.perf_counter()
        self.transformer(
            hidden_states=self.hidden, timestep=self.timestep, encoder_hidden_states=self.embeds, return_dict=False
        )
        return time.perf_counter() - start


def set_threads(threads: int | None) -> None:
    """The same thread count here and in the worker process (spawned: it reads OMP_NUM_THREADS).
    On a machine other jobs load, one thread avoids OpenMP's barrier waits, which can make a
    two-thread forward of a small model tens of times slower than a one-thread one."""
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="checkpoint dir (default: build the bench one)")
    parser.add_argument("--size", type=int, default=256, help="height and width in pixels")
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--steps", type=int, default=2, help="steps of the shorter request")
    parser.add_argument("--extra-steps", type=int, default=4, help="steps the longer request adds")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads of both sides (default: torch's, one per core)"
    )
    args = parser.parse_args()
    set_threads(args.threads)
    with checkpoint_or_tiny(args.model, size="bench") as model, tempfile.TemporaryDirectory() as out:
        client = EngineClient(ServerConfig(model_dir=model, output_dir=Path(out)))
        client.start()
        bare = BareForward(model, args)
        bare()  # first-call allocations, as the engine's calibration does for the worker
        try:
            rounds = []  # (bare forward, worker step, engine step) seconds, measured back to back
            for repeat in range(args.repeats):
                wall, reported = engine_step(client, args, repeat)
                forward = statistics.median(bare() for _ in range(args.extra_steps))
                rounds.append((forward, reported, wall))
        finally:
            client.stop()
    report(args, rounds)


def report(args, rounds: list[tuple[float, float, float]]) -> None:
    """Medians of the seconds, and of each round's ratios to that round's bare forward (a round's
    three figures were measured within a minute of each other, under the same load)."""
    print(
        f"{args.size}x{args.size}, {args.frames} frames, CFG (2 rows); {args.repeats} rounds of "
        f"{args.extra_steps} steps; cores: {os.cpu_count()}, torch threads: {torch.get_num_threads()}"
    )
    print(f"{'':34}{'s / step':>10}{'vs bare':>10}")
    names = ("bare transformer forward", "worker's step (runner)", "engine's step (client's view)")
    ratios = [[r[i] / r[0] for r in rounds] for i in range(3)]
    for i, name in enumerate(names):
        print(f"{name:34}{statistics.median(r[i] for r in rounds):10.3f}{statistics.median(ratios[i]):10.3f}")
    runner = statistics.median(r[1] / r[0] - 1 for r in rounds)
    total = statistics.median(ratios[2]) - 1
    print(f"overhead: runner {100 * runner:+.1f}%, total {100 * total:+.1f}% (target: within 5%)")
    print("per round (bare, worker, engine s):", "; ".join(" ".join(f"{x:.3f}" for x in r) for r in rounds))


if __name__ == "__main__":
    main()
