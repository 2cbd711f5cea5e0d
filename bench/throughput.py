"""Throughput: N concurrent requests through reelserve's HTTP server vs the same N one after
another through diffusers' WanPipeline in a plain loop, on the same checkpoint, in one run.

    python bench/throughput.py                      # tiny checkpoint, 8 requests, 1 worker
    python bench/throughput.py --requests 8 --workers 2 --steps 8

Prints requests per minute of each, the ratio, and p50/p95 latency. The server runs as a
subprocess (`reelserve serve`), so its numbers include HTTP, queueing and MP4 encoding; the
diffusers loop stops at decoded frames (no MP4), which favours the baseline slightly.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from models.tiny import checkpoint_or_tiny


def request_body(args, i: int) -> dict:
    return {
        "prompt": f"a red square moving left, take {i}",
        "height": args.size,
        "width": args.size,
        "num_frames": args.frames,
        "num_inference_steps": args.steps,
        "seed": i,
    }


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


def run_reelserve(model: Path, args) -> tuple[float, list[float]]:
    proc, url = start_server(model, args)
    try:
        with httpx.Client(base_url=url, timeout=600) as http:
            http.post("/generate", json=request_body(args, -1))  # warm-up outside the timing

            def one(i: int) -> float:
                start = time.perf_counter()
                response = http.post("/generate", json=request_body(args, i))
                response.raise_for_status()
                return time.perf_counter() - start

            start = time.perf_counter()
            with ThreadPoolExecutor(args.requests) as pool:
                latencies = list(pool.map(one, range(args.requests)))
            return time.perf_counter() - start, latencies
    finally:
        proc.terminate()
        proc.wait(30)


def run_diffusers(model: Path, args) -> tuple[float, list[float]]:
    import torch
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(model, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)

    def one(i: int) -> float:
        body = request_body(args, i)
        start = time.perf_counter()
        pipe(
            body["prompt"],
            height=args.size,
            width=args.size,
            num_frames=args.frames,
            num_inference_steps=args.steps,
            guidance_scale=4.0,
            guidance_scale_2=3.0,
            generator=torch.Generator("cpu").manual_seed(i),
            output_type="np",
        )
        return time.perf_counter() - start

    one(-1)  # warm-up
    start = time.perf_counter()
    # One after another, as a hand-written script serving requests would: latency includes the wait.
    latencies, elapsed = [], 0.0
    for i in range(args.requests):
        elapsed += one(i)
        latencies.append(elapsed)
    return time.perf_counter() - start, latencies


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="checkpoint dir (default: build the tiny one)")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    with checkpoint_or_tiny(args.model, size="tiny") as model:
        ours = run_reelserve(model, args)
        theirs = run_diffusers(model, args)
    print(
        f"{args.requests} requests of {args.size}x{args.size}, {args.frames} frames, {args.steps} steps, CFG; "
        f"reelserve workers: {args.workers}; cores: {os.cpu_count()}"
    )
    print(f"{'':22}{'reelserve':>12}{'diffusers':>12}{'ratio':>8}")
    rpm = [60 * args.requests / wall for wall, _ in (ours, theirs)]
    print(f"{'requests / minute':22}{rpm[0]:12.1f}{rpm[1]:12.1f}{rpm[0] / rpm[1]:8.2f}")
    for q in (50, 95):
        values = [percentile(lat, q) for _, lat in (ours, theirs)]
        print(f"{f'p{q} latency (s)':22}{values[0]:12.2f}{values[1]:12.2f}{values[0] / values[1]:8.2f}")


if __name__ == "__main__":
    main()
