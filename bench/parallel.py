"""Denoising step time of a worker group of N ranks vs one process, on the same checkpoint and
request, in one run: what Ulysses (and CFG-parallel) buys, or on a CPU what its communication costs.

    python bench/parallel.py                                   # CPU: a bench-size tiny model, 1 vs 2 ranks
    python bench/parallel.py --model /models/Wan2.2-T2V-A14B-Diffusers --device cuda \
        --sizes 1,2,4,8 --height 720 --width 1280 --frames 81  # a GPU host: 1/2/4/8 GPUs

Each round launches every configuration in turn (spawned ranks, gloo on CPU, NCCL on GPU, each
rank loading the whole model through the production loader and splitting its experts with
serve/worker/group.py), takes one warm step, then times `--steps` steps of one CFG request (a
barrier before each, timed on rank 0); medians over `--rounds` rounds, so load from other
processes hits every configuration alike. `--cfg 2` runs the CFG halves on two halves of the group
(sizes must then be even, or 1). On a CPU the ranks split the cores (`--threads` in all), so a group
of 2 does the same arithmetic on the same cores as one process: expect no speedup there; the ratio is
the price of the all-to-alls and the gather.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.multiprocessing as mp

from models.tiny import checkpoint_or_tiny
from serve.engine.request import GenerationParams
from serve.worker.group_args import GroupArgs, fresh_address


def request(args) -> GenerationParams:
    return GenerationParams(
        "a red square moving left", "blurry", args.height, args.width, args.frames, 16, args.steps + 1, 4.0, 3.0, seed=0
    )


def rank_main(rank: int, group: GroupArgs | None, args, results) -> None:
    """One rank: load, split, one warm step, then `args.steps` timed steps (seconds, on rank 0)."""
    from serve.worker import group as torch_group
    from serve.worker.model_runner import ModelRunner

    size = 1 if group is None else group.world_size
    torch.set_num_threads(max(1, args.threads // size) if args.device == "cpu" else 1)
    device = args.device if args.device == "cpu" else f"{args.device}:{rank}"
    if group is not None:
        group = group.for_rank(rank, group.address)
        torch_group.join(group)
    runner = ModelRunner.from_checkpoint(args.model, device=device, dtype=getattr(torch, args.dtype))
    if group is not None:
        torch_group.parallelize(runner, group)
    (state,) = runner.start([request(args)])
    experts = runner.experts_of(state)
    times = []
    for step in range(args.steps + 1):
        _barrier(group, device)
        start = time.perf_counter()
        runner.denoise_step([state], experts[step])
        _sync(device)
        times.append(time.perf_counter() - start)
    if rank == 0:
        results.put(statistics.median(times[1:]))
    if group is not None:
        torch_group.leave()


def _barrier(group: GroupArgs | None, device: str) -> None:
    if group is not None:
        torch.distributed.barrier()
    _sync(device)


def _sync(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize(torch.device(device))


def step_time(size: int, args) -> float:
    """Median seconds per step of one group of `size` ranks (1: a plain process)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    cfg = args.cfg if size > 1 else 1
    group = None
    if size > 1:
        devices = tuple(args.device if args.device == "cpu" else f"{args.device}:{r}" for r in range(size))
        group = GroupArgs(devices, size // cfg, cfg, address=fresh_address())
    procs = [ctx.Process(target=rank_main, args=(r, group, args, results)) for r in range(size)]
    for p in procs:
        p.start()
    seconds = results.get(timeout=3600)
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"a rank of the group of {size} exited with {p.exitcode}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory (default: a bench-size tiny checkpoint)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    parser.add_argument("--sizes", default="1,2", help="group sizes to compare, the first is the baseline")
    parser.add_argument("--cfg", type=int, default=1, choices=[1, 2])
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per launch (after one warm step)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads in all, split by rank")
    args = parser.parse_args()
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    sizes = [int(s) for s in args.sizes.split(",")]
    with checkpoint_or_tiny(args.model) as model:
        args.model = str(model)
        samples: dict[int, list[float]] = {s: [] for s in sizes}
        for _ in range(args.rounds):
            for size in sizes:
                samples[size].append(step_time(size, args))
    base = statistics.median(samples[sizes[0]])
    print(
        f"{args.height}x{args.width}, {args.frames} frames, CFG on, {args.device}, cfg={args.cfg}, {args.rounds} rounds"
    )
    print(f"{'ranks':>6}{'s/step med':>12}{'s/step min':>12}{'speedup':>9}")
    for size in sizes:
        med = statistics.median(samples[size])
        print(f"{size:>6}{med:>12.3f}{min(samples[size]):>12.3f}{base / med:>9.2f}")


if __name__ == "__main__":
    main()
