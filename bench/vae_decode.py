"""Peak memory and time of chunked/tiled VAE decode against diffusers' untiled decode, side by side.

Every configuration runs in a fresh subprocess, so one run's freed-but-cached pages cannot hide the
next one's peak. Memory is the rise of RSS (sampled every millisecond in a thread) over the RSS just
before decoding; tracemalloc would not see torch's allocations. The chunked configurations consume
chunks as the MP4 path does (uint8 from the decoder, then dropped): chunk-major never holds the whole
video; tile-major holds it as uint8 until the last tile is done.

    python bench/vae_decode.py                      # 256x256, 33 frames, Wan2.1 VAE layout at base_dim 16
    python bench/vae_decode.py --only tile-major    # only the tile-major configs and the full decode
    python bench/vae_decode.py --base-dim 96        # the real Wan2.1 width (about 40x slower on CPU)

Columns: wall seconds, CPU seconds of the process (all threads; on a machine shared with other work
wall time swings with the load, CPU time less so), and `area`: pixels decoded over pixels of the frame,
the compute a tiled decode adds by decoding each overlap in two tiles (1.56 for 128/32 tiles of 256 px).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

TILE_128 = dict(tile_sample_size=128, tile_sample_overlap=32)
CONFIGS: dict[str, dict] = {
    "full (diffusers decode)": {},
    "chunk 1, untiled": dict(chunk_latent_frames=1),
    "tile 128/32, chunk 1": dict(TILE_128, chunk_latent_frames=1),
    "tile 128/32, chunk 2": dict(TILE_128, chunk_latent_frames=2),
    "tile 128/32, chunk 1, 2 workers": dict(TILE_128, workers=2),
    "tile 192/64, chunk 1": dict(tile_sample_size=192, tile_sample_overlap=64, chunk_latent_frames=1),
    "tile-major 128/32, chunk 1": dict(TILE_128, chunk_latent_frames=1, order="tile-major"),
    "tile-major 128/32, chunk 2": dict(TILE_128, chunk_latent_frames=2, order="tile-major"),
    "tile-major 128/32, chunk 1, 2 workers": dict(TILE_128, workers=2, order="tile-major"),
    # The default before one thread per tile: the caller's 2 intra-op threads on every small tile op.
    "tile-major 128/32, chunk 1, 2 threads": dict(TILE_128, order="tile-major", threads_per_worker=2),
    "tile-major 192/64, chunk 1": dict(tile_sample_size=192, tile_sample_overlap=64, order="tile-major"),
    "tile-major 64/16, chunk 1": dict(tile_sample_size=64, tile_sample_overlap=16, order="tile-major"),
    # Two cores at about one 128 px tile's memory: two smaller tiles at once.
    "tile-major 96/24, 2 workers (small tiles)": dict(
        tile_sample_size=96, tile_sample_overlap=24, workers=2, order="tile-major"
    ),
    "tile-major 80/16, 2 workers (small tiles)": dict(
        tile_sample_size=80, tile_sample_overlap=16, workers=2, order="tile-major"
    ),
}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class PeakRss:
    """Samples RSS in a thread; `rise` is the peak over the value at entry."""

    def __enter__(self) -> PeakRss:
        self.start = self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def rise(self) -> int:
        return self.peak - self.start


def run_child(spec: dict) -> dict:
    import gc

    import torch
    from diffusers import AutoencoderKLWan

    from models.wan.vae_decode import ChunkedVaeDecoder
    from serve.vae import VaeDecodeConfig

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=spec["base_dim"], z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2).eval()
    vae.encoder = None  # decode only: the encoder's weights are not part of what is measured
    latent_frames = (spec["frames"] - 1) // 4 + 1
    z = torch.randn(1, 16, latent_frames, spec["size"] // 8, spec["size"] // 8)
    decoder = ChunkedVaeDecoder(vae, VaeDecodeConfig(**spec["config"])) if spec["config"] else None
    gc.collect()
    with torch.inference_mode(), PeakRss() as rss:
        start, cpu_start = time.perf_counter(), time.process_time()
        if decoder is None:
            frames = vae.decode(z).sample.shape[2]
        else:
            frames = sum(chunk.shape[2] for chunk in decoder.iter_chunks(z, as_uint8=True))
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    area = decoded_area(decoder, z) if decoder is not None else 1.0
    return {"peak_rise": rss.rise, "seconds": seconds, "cpu_seconds": cpu_seconds, "frames": frames, "area": area}


def decoded_area(decoder, z) -> float:
    """Pixels decoded (overlaps counted once per tile) over pixels of the frame: what overlap costs."""
    grid = decoder.grid(z.shape[3], z.shape[4])
    tiles = sum((t.y1 - t.y0) * (t.x1 - t.x0) for t in grid.tiles)
    return tiles / (z.shape[3] * z.shape[4])


def measure(name: str, args: argparse.Namespace) -> dict:
    spec = {"base_dim": args.base_dim, "size": args.size, "frames": args.frames, "config": CONFIGS[name]}
    env = dict(os.environ)
    if not args.glibc_default:
        # glibc raises its mmap threshold (up to 32 MiB) each time a large block is freed, after which
        # freed tile-sized blocks stay in the heap and RSS reports allocator retention, not live tensors.
        # A fixed threshold makes RSS follow live memory for every config alike.
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], check=True, capture_output=True, text=True, env=env
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-dim", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--frames", type=int, default=33)
    parser.add_argument("--repeats", type=int, default=1, help="runs per config; medians are reported")
    parser.add_argument("--glibc-default", action="store_true", help="keep glibc's dynamic mmap threshold")
    parser.add_argument("--only", help="run only the configs whose name contains this (plus the full decode)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return
    print(f"glibc mmap threshold: {'dynamic (default)' if args.glibc_default else 'fixed at 128 KiB'}")
    print(f"Wan2.1 VAE layout, base_dim {args.base_dim}, {args.size}x{args.size}, {args.frames} frames, random weights")
    results = {}
    for name in [n for n in CONFIGS if not args.only or args.only in n or not CONFIGS[n]]:
        runs = [measure(name, args) for _ in range(args.repeats)]
        results[name] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    full = results["full (diffusers decode)"]
    print(
        f"{'config':40s} {'frames':>6s} {'peak rise MiB':>14s} {'x full':>7s} {'seconds':>8s} {'x full':>7s} "
        f"{'CPU s':>7s} {'x full':>7s} {'area':>5s}"
    )
    for name, r in results.items():
        print(
            f"{name:40s} {r['frames']:6.0f} {r['peak_rise'] / 2**20:14.0f} {r['peak_rise'] / full['peak_rise']:7.2f} "
            f"{r['seconds']:8.2f} {r['seconds'] / full['seconds']:7.2f} {r['cpu_seconds']:7.2f} "
            f"{r['cpu_seconds'] / full['cpu_seconds']:7.2f} {r['area']:5.2f}"
        )


if __name__ == "__main__":
    main()
