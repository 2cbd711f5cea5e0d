"""Throughput: N requests through reelserve's HTTP server vs diffusers' WanPipeline on the same
checkpoint, steps and size, in one run, three ways:

- reelserve: N concurrent `POST /generate` (1 worker unless `--workers`), MP4s included;
- diffusers loop: the N prompts one after another, as a hand-written script serving requests would;
- diffusers batch: `WanPipeline(prompt=[N prompts])`, diffusers' own offline batching (one text
  encode, one forward of 2N rows per step, one VAE decode). Both diffusers columns stop at decoded
  frames (no MP4), which favours them slightly.

And a staggered scenario: the N requests arrive on a seeded Poisson schedule over the first half
of the run (N arrival times drawn uniformly over [0, T/2] and sorted: a Poisson process given N
arrivals; T is the faster of diffusers' two warm-up batches) and reelserve takes them in as they come,
against a static batch that waits for all N and then runs diffusers' batch: its latency for each
request is (last arrival - arrival) + that round's measured batch time, exact without sleeping
it out. Every round runs all columns back to back, and the staggered ratios are taken round by
round, so load from other jobs on a shared machine hits both sides of a ratio alike.

    python bench/throughput.py --steps 8                           # tiny checkpoint
    python bench/throughput.py --steps 40
    python bench/throughput.py --model models/demo/checkpoint --frames 17 --steps 20

Prints requests per minute and p50/p95 latency with ratios (medians over `--repeats`), the
per-stage seconds of each (reelserve's from its Server-Timing header: the median request's share
of each stage, batch units counted whole in each member), and the staggered medians.
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from models.tiny import checkpoint_or_tiny

STAGES = ("queue", "text_encode", "denoise", "decode", "mp4")
WARMUP = 10**6  # the warm-up request's index: a prompt and seed no timed request has


def request_body(args, i: int) -> dict:
    return {
        "prompt": prompt(i),
        "height": args.size,
        "width": args.size,
        "num_frames": args.frames,
        "num_inference_steps": args.steps,
        "seed": i,
    }


def prompt(i: int) -> str:
    return f"a red square moving left, take {i}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "serve.cli",
        "serve",
        "--model",
        str(model),
        "--port",
        str(port),
        "--workers",
        str(args.workers),
        "--max-batch-size",
        str(args.requests),
        *shlex.split(args.serve_flags),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not become ready")


def parse_server_timing(header: str) -> dict[str, float]:
    """`name;dur=ms, ...` -> seconds by name."""
    out = {}
    for part in header.split(","):
        name, _, dur = part.strip().partition(";dur=")
        out[name] = float(dur) / 1000
    return out


class Reelserve:
    """One server for every reelserve run (it is warmed up once, outside the timing)."""

    def __init__(self, model: Path, args) -> None:
        self.args = args
        self.proc, url = start_server(model, args)
        self.http = httpx.Client(base_url=url, timeout=1800, limits=httpx.Limits(max_connections=args.requests))
        self.post(WARMUP)

    def close(self) -> None:
        self.http.close()
        self.proc.terminate()
        self.proc.wait(30)

    def post(self, i: int) -> tuple[float, dict[str, float]]:
        """(latency seconds, stage seconds) of one request."""
        start = time.perf_counter()
        response = self.http.post("/generate", json=request_body(self.args, i))
        response.raise_for_status()
        return time.perf_counter() - start, parse_server_timing(response.headers["server-timing"])

    def concurrent(self) -> tuple[float, list[float], list[dict[str, float]]]:
        """All N at once: (wall, latencies, stage timings)."""
        start = time.perf_counter()
        with ThreadPoolExecutor(self.args.requests) as pool:
            results = list(pool.map(self.post, range(self.args.requests)))
        return time.perf_counter() - start, [r[0] for r in results], [r[1] for r in results]

    def staggered(self, arrivals: list[float]) -> list[float]:
        """Each request sent at its arrival time (seconds from the start): their latencies."""
        start = time.perf_counter()
        latencies = [0.0] * len(arrivals)

        def send(i: int) -> None:
            time.sleep(max(0.0, start + arrivals[i] - time.perf_counter()))
            latencies[i] = self.post(i)[0]

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(arrivals))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return latencies


class Diffusers:
    def __init__(self, model: Path, args) -> None:
        import torch
        from diffusers import WanPipeline

        if args.threads is not None:
            torch.set_num_threads(args.threads)
        self.torch, self.args = torch, args
        self.pipe = WanPipeline.from_pretrained(model, dtype=torch.float32)
        self.pipe.set_progress_bar_config(disable=True)
        # Warm-up (first-call allocations); the batch's time also sets the staggered horizon: the
        # faster of two, as other jobs on a shared machine only ever add time.
        self.warmup_batch_s = min(self.batch()["total"] for _ in range(2))
        self.one(WARMUP)

    def run(self, prompts: list[str], seeds: list[int]) -> dict[str, float]:
        """One pipeline call; its stages' seconds: text_encode (encode_prompt), denoise (to the
        last step's callback), decode (the rest: VAE decode and postprocessing)."""
        marks: dict[str, float] = {}
        encode = self.pipe.encode_prompt

        def timed_encode(*a, **kw):
            marks["encode_start"] = time.perf_counter()
            try:
                return encode(*a, **kw)
            finally:
                marks["encode_end"] = time.perf_counter()

        def on_step(pipe, step, timestep, kwargs):
            marks["denoise_end"] = time.perf_counter()
            return kwargs

        self.pipe.encode_prompt = timed_encode  # measuring only: the call goes through unchanged
        try:
            start = time.perf_counter()
            self.pipe(
                prompts,
                height=self.args.size,
                width=self.args.size,
                num_frames=self.args.frames,
                num_inference_steps=self.args.steps,
                guidance_scale=4.0,
                guidance_scale_2=3.0,
                generator=[self.torch.Generator("cpu").manual_seed(s) for s in seeds],
                output_type="np",
                callback_on_step_end=on_step,
            )
            end = time.perf_counter()
        finally:
            del self.pipe.encode_prompt
        return {
            "text_encode": marks["encode_end"] - marks["encode_start"],
            "denoise": marks["denoise_end"] - marks["encode_end"],
            "decode": end - marks["denoise_end"],
            "total": end - start,
        }

    def one(self, i: int) -> dict[str, float]:
        return self.run([prompt(i)], [i])

    def batch(self) -> dict[str, float]:
        n = self.args.requests
        return self.run([prompt(i) for i in range(n)], list(range(n)))

    def loop(self) -> tuple[float, list[float], list[dict[str, float]]]:
        """One after another: each latency includes the wait for the ones before it."""
        latencies, stages, elapsed = [], [], 0.0
        for i in range(self.args.requests):
            stages.append(self.one(i))
            elapsed += stages[-1]["total"]
            latencies.append(elapsed)
        return elapsed, latencies, stages


def poisson_arrivals(n: int, horizon: float, seed: int) -> list[float]:
    """n arrival times of a Poisson process over [0, horizon] given n arrivals: sorted uniforms."""
    rng = random.Random(seed)
    return sorted(rng.uniform(0, horizon) for _ in range(n))


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def median_stages(stages: list[dict[str, float]]) -> dict[str, float]:
    return {name: statistics.median(s.get(name, 0.0) for s in stages) for name in (*STAGES, "total")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="checkpoint dir (default: build the tiny one)")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of every column; medians are printed")
    parser.add_argument("--seed", type=int, default=0, help="of the staggered arrival schedule")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads of both sides (default: torch's, one per core)"
    )
    parser.add_argument("--serve-flags", default="", help='more flags for `reelserve serve`: "--cfg-mode sequential"')
    args = parser.parse_args()
    if args.threads is not None:
        # Read by torch here and in the server and its workers (subprocesses inherit it). On a
        # machine other jobs load, one thread avoids OpenMP's barrier waits, which can make a
        # two-thread forward of the tiny model tens of times slower than a one-thread one.
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    with checkpoint_or_tiny(args.model, size="tiny") as model:
        theirs, ours = Diffusers(model, args), Reelserve(model, args)
        try:
            # Rounds alternate the columns, so load from other jobs on the machine hits all alike;
            # each round's static batch is compared with that round's staggered run.
            arrivals = poisson_arrivals(args.requests, theirs.warmup_batch_s / 2, args.seed)
            rounds, concurrent, staggered = [], [], []
            for _ in range(args.repeats):
                rounds.append((theirs.batch(), theirs.loop()))
                concurrent.append(ours.concurrent())
                staggered.append(ours.staggered(arrivals))
        finally:
            ours.close()
    report(args, concurrent, rounds, staggered, arrivals)


def report(args, concurrent, rounds, staggered, arrivals) -> None:
    n = args.requests
    batch_s = statistics.median(b["total"] for b, _ in rounds)
    walls = [statistics.median(c[0] for c in concurrent), statistics.median(loop[0] for _, loop in rounds), batch_s]
    print(
        f"{n} requests of {args.size}x{args.size}, {args.frames} frames, {args.steps} steps, CFG; reelserve "
        f"workers: {args.workers}; cores: {os.cpu_count()}; torch threads: {args.threads or 'default'}; "
        f"medians of {args.repeats} rounds" + (f"; reelserve serve {args.serve_flags}" if args.serve_flags else "")
    )
    print(f"{'':22}{'reelserve':>12}{'diff. loop':>12}{'diff. batch':>12}{'vs loop':>9}{'vs batch':>9}")
    rpm = [60 * n / w for w in walls]
    print(
        f"{'requests / minute':22}"
        + "".join(f"{x:12.1f}" for x in rpm)
        + f"{rpm[0] / rpm[1]:9.2f}{rpm[0] / rpm[2]:9.2f}"
    )
    for q in (50, 95):
        ours = statistics.median(percentile(c[1], q) for c in concurrent)
        loop = statistics.median(percentile(lp[1], q) for _, lp in rounds)
        values = [ours, loop, batch_s]  # a batch answers everyone at its end
        print(
            f"{f'p{q} latency (s)':22}"
            + "".join(f"{x:12.2f}" for x in values)
            + f"{values[1] / values[0]:9.2f}{values[2] / values[0]:9.2f}"
        )
    print("stage seconds (reelserve: the median request's, batch units whole; diffusers: per call):")
    ours_stages = median_stages([s for c in concurrent for s in c[2]])
    loop_stages = median_stages([s for _, lp in rounds for s in lp[2]])
    batch_stages = median_stages([b for b, _ in rounds])
    for name in (*STAGES, "total"):
        values = [ours_stages[name], loop_stages[name], batch_stages[name]]
        print(f"  {name:20}" + "".join(f"{x:12.3f}" for x in values))
    print(
        f"staggered: arrivals (Poisson, seed {args.seed}, over half the warm-up batch's time) at "
        + " ".join(f"{a:.2f}" for a in arrivals)
    )
    print(f"{'':22}{'reelserve':>12}{'static':>12}{'ratio':>9}")
    for name, pick in (("median latency (s)", statistics.median), ("mean latency (s)", statistics.mean)):
        ours = [pick(s) for s in staggered]
        static = [pick([arrivals[-1] - a + b["total"] for a in arrivals]) for b, _ in rounds]
        ratio = statistics.median(st / o for st, o in zip(static, ours, strict=True))  # round by round
        print(f"  {name:20}{statistics.median(ours):12.2f}{statistics.median(static):12.2f}{ratio:9.2f}")
    ours_end = [max(a + lat for a, lat in zip(arrivals, s, strict=True)) for s in staggered]
    static_end = [arrivals[-1] + b["total"] for b, _ in rounds]
    ratio = statistics.median(st / o for st, o in zip(static_end, ours_end, strict=True))
    print(f"  {'last done (s)':20}{statistics.median(ours_end):12.2f}{statistics.median(static_end):12.2f}{ratio:9.2f}")


if __name__ == "__main__":
    main()
