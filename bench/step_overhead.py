"""Engine overhead per denoising step: a request's step through the whole engine (engine loop,
scheduler, pipe to the worker process, the runner's batching, CFG combine, sampler update) vs the
bare transformer forward on the same inputs (the CFG pair as one batch of two rows), in one run.

    reelserve tiny --size bench /tmp/bench-ckpt         # ~300 MB, random weights
    python bench/step_overhead.py --model /tmp/bench-ckpt

The engine's time per step is the difference of two requests' wall times, with `--steps` and with
`--steps + --extra-steps` steps, divided by the extra steps: text encoding, decoding and MP4 cancel
out, what remains is what one more step costs a client, gaps between steps included. The worker's
own time per step (the `denoise` stage it reports) splits that into the runner's share and the
engine loop + IPC share. Rounds alternate the engine pair, bare forwards and the runner's steps
loaded in this process, so load from other processes hits all alike; medians and minima over
`--repeats` rounds. The runner's steps and the bare forwards are also timed in CPU seconds,
which other jobs on a shared machine do not inflate (with `--threads 1` the work is all in this
process's one thread).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
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
    def __call__(self) -> tuple[float, float]:
        """(wall, CPU) seconds of one forward."""
        with timed() as seconds:
            self.transformer(
                hidden_states=self.hidden, timestep=self.timestep, encoder_hidden_states=self.embeds, return_dict=False
            )
        return seconds


class RunnerSteps:
    """The worker's runner loaded here, so its steps can be timed in CPU seconds too (a worker
    process's CPU time is out of reach; on a loaded machine wall time is mostly other jobs')."""

    def __init__(self, model: Path, args) -> None:
        from serve.worker.model_runner import ModelRunner

        self.runner = ModelRunner.from_checkpoint(model)
        self.runner.denoise.set_activation_plan("batched", 1)
        self.args = args

    def __call__(self, seed: int) -> list[tuple[float, float]]:
        """(wall, CPU) seconds of each step of a fresh `--extra-steps` request."""
        (state,) = self.runner.start([params(self.args, self.args.extra_steps, seed)])
        out = []
        for expert in self.runner.experts_of(state):
            with timed() as seconds:
                self.runner.denoise_step([state], expert)
            out.append(seconds)
        return out


class timed:
    """`with timed() as seconds:` fills `seconds` with (wall, process CPU) on exit."""

    def __enter__(self) -> list[float]:
        self.seconds: list[float] = []
        self.start = (time.perf_counter(), time.process_time())
        return self.seconds

    def __exit__(self, *exc) -> None:
        self.seconds += [time.perf_counter() - self.start[0], time.process_time() - self.start[1]]


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
        # CFG batched on both sides of the comparison (the bare forward runs the pair as one batch of
        # two rows; a CPU's default would be two forwards of one row each).
        client = EngineClient(ServerConfig(model_dir=model, output_dir=Path(out), memory={"cfg_mode": "batched"}))
        client.start()
        bare, runner = BareForward(model, args), RunnerSteps(model, args)
        bare(), runner(seed=10**6)  # first-call allocations, as the engine's calibration does for the worker
        try:
            rounds = []
            for repeat in range(args.repeats):
                wall, reported = engine_step(client, args, repeat)
                forwards = [bare() for _ in range(args.extra_steps)]
                steps = runner(seed=repeat)
                rounds.append(Round(forwards, steps, reported, wall))
        finally:
            client.stop()
    report(args, rounds)


@dataclass
class Round:
    """One round's figures, measured back to back (within a minute, under the same load)."""

    forwards: list[list[float]]  # (wall, CPU) of each bare forward
    runner_steps: list[list[float]]  # (wall, CPU) of each in-process runner step
    worker_step: float  # wall per step the worker reported to the engine
    engine_step: float  # wall per step the client saw


def report(args, rounds: list[Round]) -> None:
    print(
        f"{args.size}x{args.size}, {args.frames} frames, CFG (2 rows); {args.repeats} rounds of "
        f"{args.extra_steps} steps; cores: {os.cpu_count()}, torch threads: {torch.get_num_threads()}"
    )
    forward = [f for r in rounds for f in r.forwards]
    runner = [s for r in rounds for s in r.runner_steps]
    rows = [
        ("bare transformer forward", [f[0] for f in forward], [f[1] for f in forward]),
        ("runner's step, in process", [s[0] for s in runner], [s[1] for s in runner]),
        ("worker's step (its report)", [r.worker_step for r in rounds], None),
        ("engine's step (client's view)", [r.engine_step for r in rounds], None),
    ]
    bare_wall, bare_cpu = statistics.median(rows[0][1]), statistics.median(rows[0][2])
    print(f"{'seconds per step':32}{'wall med':>9}{'min':>7}{'max':>7}{'vs bare':>9}{'CPU med':>9}{'vs bare':>9}")
    for name, wall, cpu in rows:
        med = statistics.median(wall)
        line = f"{name:32}{med:9.3f}{min(wall):7.2f}{max(wall):7.2f}{med / bare_wall:9.3f}"
        if cpu is not None:
            line += f"{statistics.median(cpu):9.3f}{statistics.median(cpu) / bare_cpu:9.3f}"
        print(line)
    runner_cpu = statistics.median(rows[1][2]) / bare_cpu - 1
    engine_wall = statistics.median(rows[3][1]) / bare_wall - 1
    print(
        f"overhead (target: within 5%): the runner's step {100 * runner_cpu:+.1f}% in CPU seconds; the engine's "
        f"step {100 * engine_wall:+.1f}% in wall seconds (medians; on a machine shared with other jobs the wall "
        "figures swing between min and max, CPU seconds do not)"
    )


if __name__ == "__main__":
    main()
