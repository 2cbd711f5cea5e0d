"""Every CUDA path of reelserve against its CPU or unoptimised path, with assertions and figures.

`bench/gpu_check.sh` runs this on a GPU host; `--cpu` runs the same checks with the CPU as the
"device" (tiny size by default), which is how the logic is tested without a GPU (tests/test_gpu_check.py).
Each section prints PASS or FAIL with its figures; the exit status is 1 if any section failed.

    bench/gpu_check.sh                         # cuda:0, a bench-size random checkpoint (~330 MB), bf16
    python bench/gpu_check.py --cpu            # the same checks on the CPU, tiny checkpoint
    python bench/gpu_check.py --only storage,w8a8 --json /tmp/gpu_check.json

Sections (reference in brackets; tolerances are relative L2 errors unless said otherwise):
  storage      bf16 / int8-wo / fp8-wo weights on the device     [same scheme on the CPU in fp32]
  w8a8         W8A8 int8 (`torch._int_mm`) and fp8 (`torch._scaled_mm`) linears and raw ops  [CPU]
  residency    expert swap and block offload (pinned prefetch) [resident frames; ledger vs real tensors
               and torch.cuda.memory_allocated]
  batching     4 requests stepped in one batch                   [each stepped alone]
  decode_lane  a decode on the lane's side stream while 2 other requests step   [the two one after the
               other: the same frames and latents; the time saved]
  tiled_vae    tiled decode, tile-major                          [diffusers' tiled_decode; PSNR vs untiled]
  load         pinned staging on a side stream                   [plain .to(device) copies, bit for bit]
  worker_group 2 GPUs, Ulysses (only with 2+ GPUs and serve/worker/group.py) [bench/parallel.py runs]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from serve.engine.request import GenerationParams

# Relative L2 error bounds. bf16 keeps 8 mantissa bits (2^-8 = 0.4% per value) and errors grow over a
# few blocks; 3% is several times what a correct bf16 forward of these models shows, and far below
# what a wrong kernel, a wrong scale or a transposed weight gives (order 1).
BF16_REL = 3e-2
# Quantized (8-bit) vs the same weights unquantized: per-channel int8 / fp8 e4m3 rounding of weights
# (and activations, W8A8) compounds over the blocks; 15% still tells a working path from noise (~1.4).
QUANT_VS_FLOAT_REL = 0.15
# Tiled vs diffusers' own tiled decode on the same device: the same arithmetic in another order.
TILED_VS_DIFFUSERS_ABS = 1e-3


class CheckFailed(AssertionError):
    pass


def check(ok: bool, why: str) -> None:
    if not ok:
        raise CheckFailed(why)


@dataclass
class Context:
    model: Path
    device: torch.device
    dtype: torch.dtype
    height: int
    width: int
    frames: int

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double().cpu(), ref.double().cpu()
    return ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def timed(ctx: Context, fn: Callable[[], object], repeats: int = 3) -> float:
    """Median seconds of `fn` after one warm call."""
    fn()
    times = []
    for _ in range(repeats):
        ctx.sync()
        start = time.perf_counter()
        fn()
        ctx.sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---- transformer weights: storage formats and W8A8 ----------------------------------------------------


def transformer_inputs(module: torch.nn.Module, rows: int = 2) -> dict[str, torch.Tensor]:
    config, gen = module.config, torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(rows, config.in_channels, 3, 16, 16, generator=gen),
        timestep=torch.tensor([700.0] * rows),
        encoder_hidden_states=torch.randn(rows, 32, config.text_dim, generator=gen),
    )


@torch.inference_mode()
def forward(module: torch.nn.Module, inputs: dict, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    moved = {
        k: v.to(device, dtype if v.is_floating_point() and k != "timestep" else v.dtype) for k, v in inputs.items()
    }
    return module(**moved, return_dict=False)[0].float().cpu()


def load_transformer(ctx: Context, device: torch.device, dtype: torch.dtype, scheme: str | None = None):
    from serve.loader import load_component
    from serve.quant.schemes import QuantConfig

    return load_component(ctx.model / "transformer", device, dtype, quant=QuantConfig(scheme) if scheme else None)


def compare_scheme(ctx: Context, scheme: str | None, float_ref: torch.Tensor, inputs: dict) -> dict:
    """`scheme` on the device in ctx.dtype vs the same scheme on the CPU in fp32, and vs fp32 float."""
    from serve.quant.swap import held_bytes

    cpu = torch.device("cpu")
    on_device = load_transformer(ctx, ctx.device, ctx.dtype, scheme)
    got = forward(on_device, inputs, ctx.device, ctx.dtype)
    same_on_cpu = (
        float_ref
        if scheme is None
        else forward(load_transformer(ctx, cpu, torch.float32, scheme), inputs, cpu, torch.float32)
    )
    vs_cpu, vs_float = rel_error(got, same_on_cpu), rel_error(got, float_ref)
    name = scheme or str(ctx.dtype).removeprefix("torch.")
    check(vs_cpu <= BF16_REL, f"{name} on {ctx.device}: rel error {vs_cpu:.2e} vs the CPU path > {BF16_REL}")
    check(vs_float <= QUANT_VS_FLOAT_REL, f"{name}: rel error {vs_float:.2e} vs fp32 > {QUANT_VS_FLOAT_REL}")
    seconds = timed(ctx, lambda: forward(on_device, inputs, ctx.device, ctx.dtype))
    return {f"{name} rel_vs_cpu": vs_cpu, f"{name} rel_vs_fp32": vs_float, f"{name} MiB": held_bytes(on_device) / 2**20,
            f"{name} forward_s": seconds}  # fmt: skip


def section_storage(ctx: Context) -> dict:
    cpu = torch.device("cpu")
    reference = load_transformer(ctx, cpu, torch.float32)
    inputs = transformer_inputs(reference)
    float_ref = forward(reference, inputs, cpu, torch.float32)
    figures: dict = {}
    for scheme in (None, "int8-wo", "fp8-wo"):
        figures |= compare_scheme(ctx, scheme, float_ref, inputs)
    return figures


def section_w8a8(ctx: Context) -> dict:
    from serve.quant.ops import fp8_matmul_supported, fp8_scaled_mm, int8_matmul, quantize_rows

    cpu = torch.device("cpu")
    reference = load_transformer(ctx, cpu, torch.float32)
    inputs = transformer_inputs(reference)
    float_ref = forward(reference, inputs, cpu, torch.float32)
    figures = {"fp8 tensor cores": fp8_matmul_supported(ctx.device)}
    for scheme in ("w8a8-int8", "w8a8-fp8"):
        figures |= compare_scheme(ctx, scheme, float_ref, inputs)
    # The raw kernels at a GEMM shape they accept (M > 16, K and N multiples of 16).
    gen = torch.Generator().manual_seed(1)
    a, b = (
        torch.randint(-127, 128, (64, 256), generator=gen, dtype=torch.int8),
        torch.randint(-127, 128, (256, 128), generator=gen, dtype=torch.int8),
    )
    exact = int8_matmul(a, b)
    check(
        torch.equal(int8_matmul(a.to(ctx.device), b.to(ctx.device)).cpu(), exact),
        "int8 GEMM on the device is not exact",
    )
    x, w = torch.randn(64, 256, generator=gen), torch.randn(128, 256, generator=gen)
    (xq, xs), (wq, ws) = quantize_rows(x, torch.float8_e4m3fn), quantize_rows(w, torch.float8_e4m3fn)
    dequantized = (xq.float() * xs) @ (wq.float() * ws).t()
    if ctx.device.type == "cpu" or fp8_matmul_supported(ctx.device):
        dev = ctx.device
        got = fp8_scaled_mm(xq.to(dev), xs.to(dev), wq.to(dev), ws.view(-1).to(dev), torch.bfloat16).float().cpu()
        figures["_scaled_mm rel_vs_dequantized"] = err = rel_error(got, dequantized)
        check(err <= 1e-2, f"torch._scaled_mm rel error {err:.2e} vs its dequantized product")
    figures |= gemm_speed(ctx)
    return figures


def gemm_speed(ctx: Context) -> dict:
    """int8 and fp8 GEMM time against bf16 at one large square shape (small on a CPU)."""
    from serve.quant.ops import fp8_matmul_supported, int8_matmul

    n = 4096 if ctx.device.type == "cuda" else 256
    a = torch.randn(n, n, device=ctx.device).to(torch.bfloat16)
    bf16 = timed(ctx, lambda: a @ a)
    i8 = torch.randint(-127, 128, (n, n), dtype=torch.int8, device=ctx.device)
    figures = {f"GEMM {n}^3 bf16_s": bf16, "int8 x bf16 time": timed(ctx, lambda: int8_matmul(i8, i8)) / bf16}
    if fp8_matmul_supported(ctx.device):
        f8, one = a.to(torch.float8_e4m3fn), torch.ones((), device=ctx.device)
        fp8 = timed(ctx, lambda: torch._scaled_mm(f8, f8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
        figures["fp8 x bf16 time"] = fp8 / bf16
    return figures


# ---- the runner: residency, step batching -----------------------------------------------------------------


def params(ctx: Context, seed: int = 0, steps: int = 4) -> GenerationParams:
    return GenerationParams(
        "a red square moving left", "blurry", ctx.height, ctx.width, ctx.frames, 16, steps, 4.0, 3.0, seed=seed
    )


def runner(ctx: Context, **options):
    from serve.worker.model_runner import ModelRunner

    return ModelRunner.from_checkpoint(ctx.model, device=str(ctx.device), dtype=ctx.dtype, **options)


def section_residency(ctx: Context) -> dict:
    from serve.loader.residency import ResidencyConfig

    resident = runner(ctx).decode_float(params(ctx))
    figures: dict = {}
    for mode in ("expert-swap", "block-offload"):
        run = runner(ctx, residency=ResidencyConfig(mode=mode, text_encoder="swap"))
        start = time.perf_counter()
        frames = run.decode_float(params(ctx))
        seconds = time.perf_counter() - start
        manager = run.residency
        manager.drain()
        ctx.sync()
        diff = (frames - resident).abs().max().item()
        check(diff <= 1e-5, f"{mode}: frames differ from the resident run by {diff:.2e}")
        ledger, real = manager.ledger.total, manager.actual_device_bytes()
        check(ledger == real, f"{mode}: ledger {ledger} bytes but {real} bytes of real tensors on the device")
        figures |= {f"{mode} ledger MiB": ledger / 2**20, f"{mode} ledger peak MiB": manager.ledger.peak / 2**20,
                    f"{mode} swaps": manager.swaps, f"{mode} stalls": sum(k == "stall" for k, _ in manager.events),
                    f"{mode} generate_s": seconds}  # fmt: skip
        if ctx.device.type == "cuda":
            allocated = torch.cuda.memory_allocated(ctx.device)
            check(allocated >= ledger, f"{mode}: torch.cuda.memory_allocated {allocated} < ledger {ledger}")
            figures[f"{mode} memory_allocated MiB"] = allocated / 2**20
        del run, manager
    return figures


def section_batching(ctx: Context) -> dict:
    run = runner(ctx)
    batch = [params(ctx, seed=s) for s in range(4)]
    together = run.start(batch)
    alone = [run.start([p])[0] for p in batch]
    experts = run.experts_of(together[0])

    def step_together() -> None:
        for step in range(len(experts)):
            run.denoise_step(together, experts[step])

    def step_alone() -> None:
        for state in alone:
            for step in range(len(experts)):
                run.denoise_step([state], experts[step])

    ctx.sync()
    t0 = time.perf_counter()
    step_together()
    ctx.sync()
    t1 = time.perf_counter()
    step_alone()
    ctx.sync()
    t2 = time.perf_counter()
    worst = max(rel_error(a.latents, t.latents) for a, t in zip(alone, together, strict=True))
    check(worst <= BF16_REL, f"batched latents differ from single-request latents (rel {worst:.2e})")
    return {"rel_vs_alone": worst, "batch of 4 s": t1 - t0, "4 alone s": t2 - t1, "speedup": (t2 - t1) / (t1 - t0)}


def section_decode_lane(ctx: Context) -> dict:
    """What the worker does with `--vae-overlap`: hand finished requests to the decode lane (a thread;
    on CUDA a side stream), step others meanwhile. Untiled, and tiled with 2 tile threads (which must
    queue their kernels on the lane's stream, not their own default one)."""
    from serve.vae import VaeDecodeConfig

    tiled = VaeDecodeConfig(tile_sample_size=ctx.width // 2, tile_sample_overlap=ctx.width // 8, workers=2)
    figures = {}
    for name, vae in (("untiled", VaeDecodeConfig()), ("tiled, 2 tile threads", tiled)):
        results = _lane_against_main(ctx, runner(ctx, vae_decode=vae))
        figures |= {f"{name}: {key}": value for key, value in results.items()}
    return figures


def _lane_against_main(ctx: Context, run) -> dict:
    import threading

    finished = run.start([params(ctx, seed=0)])
    experts = run.experts_of(finished[0])
    for step in range(len(experts)):
        run.denoise_step(finished, experts[step])

    def step_all(states) -> None:
        for step in range(len(experts)):
            run.denoise_step(states, experts[step])

    def decode() -> list:
        return list(run.decode_chunks(finished))

    run.denoise_step(run.start([params(ctx, seed=9)]), experts[0])  # warm both paths
    decode()
    others = [params(ctx, seed=s) for s in (1, 2)]
    alone, overlapped = run.start(others), run.start(others)
    ctx.sync()
    t0 = time.perf_counter()
    reference = decode()
    step_all(alone)
    ctx.sync()
    t1 = time.perf_counter()
    chunks: list = []
    handoff = run.lane_handoff()

    def lane() -> None:
        with handoff:
            chunks.extend(decode())

    thread = threading.Thread(target=lane)
    thread.start()
    step_all(overlapped)
    thread.join()
    ctx.sync()
    t2 = time.perf_counter()
    worst = max(int(abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(chunks, reference, strict=True))
    check(worst <= 1, f"frames decoded on the lane differ from the main lane's by {worst} levels")
    latents = max((a.latents - b.latents).abs().max().item() for a, b in zip(alone, overlapped, strict=True))
    check(latents == 0, f"steps taken beside the lane's decode changed the latents by {latents:.2e}")
    return {"max frame diff (uint8 levels)": worst, "one after the other s": t1 - t0, "overlapped s": t2 - t1,
            "speedup": (t1 - t0) / (t2 - t1)}  # fmt: skip


# ---- VAE and loading ----------------------------------------------------------------------------------------


def section_tiled_vae(ctx: Context) -> dict:
    from models.wan.vae_decode import ChunkedVaeDecoder
    from serve.loader import load_component
    from serve.vae import VaeDecodeConfig

    vae = load_component(ctx.model / "vae", ctx.device, torch.float32)
    size, frames = (256, 17) if ctx.device.type == "cuda" else (64, 5)
    z = torch.randn(
        1, vae.config.z_dim, (frames - 1) // 4 + 1, size // 8, size // 8, generator=torch.Generator().manual_seed(0)
    ).to(ctx.device)
    tile, overlap = size // 2, size // 8
    tiled = ChunkedVaeDecoder(
        vae, VaeDecodeConfig(tile_sample_size=tile, tile_sample_overlap=overlap, order="tile-major")
    )
    untiled = ChunkedVaeDecoder(vae, VaeDecodeConfig())
    with torch.inference_mode():
        got, full = peak_and_output(ctx, lambda: tiled.decode(z)), peak_and_output(ctx, lambda: untiled.decode(z))
        vae.enable_tiling(tile, tile, tile - overlap, tile - overlap)
        theirs = vae.tiled_decode(z, return_dict=False)[0].clamp(-1, 1)
        vae.disable_tiling()
    diff = (got[1] - theirs).abs().max().item()
    check(diff <= TILED_VS_DIFFUSERS_ABS, f"tiled decode differs from diffusers' tiled_decode by {diff:.2e}")
    psnr = 10 * torch.log10(4 / ((got[1] - full[1]) ** 2).mean()).item()
    figures = {"max_abs_vs_diffusers_tiled": diff, "PSNR vs untiled dB": psnr}
    figures["time tiled / untiled"] = timed(ctx, lambda: tiled.decode(z), 1) / timed(ctx, lambda: untiled.decode(z), 1)
    if ctx.device.type == "cuda":
        figures["peak memory tiled / untiled"] = got[0] / full[0]
    return figures


def peak_and_output(ctx: Context, fn: Callable[[], torch.Tensor]) -> tuple[int, torch.Tensor]:
    """(peak device memory rise in bytes on CUDA, else 0; the output on the CPU)."""
    if ctx.device.type != "cuda":
        return 0, fn().cpu()
    torch.cuda.synchronize(ctx.device)
    base = torch.cuda.memory_allocated(ctx.device)
    torch.cuda.reset_peak_memory_stats(ctx.device)
    out = fn()
    torch.cuda.synchronize(ctx.device)
    return torch.cuda.max_memory_allocated(ctx.device) - base, out.cpu()


def section_load(ctx: Context) -> dict:
    from serve.loader import load_component

    root = ctx.model / "transformer"
    nbytes = sum(p.stat().st_size for p in root.glob("*.safetensors"))
    staged = load_component(root, ctx.device, ctx.dtype, staged=True)
    direct = load_component(root, ctx.device, ctx.dtype, staged=False, readers=1)
    staged_t, direct_t = dict(staged.state_dict()), dict(direct.state_dict())
    check(sorted(staged_t) == sorted(direct_t), "staged and direct loads hold different tensors")
    bad = [n for n, t in direct_t.items() if not (t.dtype == staged_t[n].dtype and torch.equal(t, staged_t[n]))]
    check(not bad, f"staged load differs from a direct copy in {len(bad)} tensors, e.g. {bad[:3]}")
    del staged, direct, staged_t, direct_t
    t_staged = timed(ctx, lambda: load_component(root, ctx.device, ctx.dtype, staged=True), 2)
    t_direct = timed(ctx, lambda: load_component(root, ctx.device, ctx.dtype, staged=False, readers=1), 2)
    return {"staged GB/s (warm)": nbytes / t_staged / 1e9, "direct GB/s (warm)": nbytes / t_direct / 1e9,
            "staged / direct time": t_staged / t_direct}  # fmt: skip


def section_worker_group(ctx: Context) -> dict | None:
    """None (skipped) unless 2+ GPUs and the worker-group module are there."""
    if (
        ctx.device.type != "cuda"
        or torch.cuda.device_count() < 2
        or importlib.util.find_spec("serve.worker.group") is None
    ):
        return None
    script = Path(__file__).with_name("parallel.py")
    command = [sys.executable, str(script), "--model", str(ctx.model), "--device", "cuda", "--sizes", "1,2",
               "--rounds", "1", "--steps", "3", "--height", str(ctx.height), "--width", str(ctx.width)]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    check(run.returncode == 0, f"bench/parallel.py failed: {run.stderr[-2000:]}")
    return {"bench/parallel.py": run.stdout.strip().splitlines()[-3:]}


SECTIONS: dict[str, Callable[[Context], dict | None]] = {
    "storage": section_storage,
    "w8a8": section_w8a8,
    "residency": section_residency,
    "batching": section_batching,
    "decode_lane": section_decode_lane,
    "tiled_vae": section_tiled_vae,
    "load": section_load,
    "worker_group": section_worker_group,
}


def run_sections(ctx: Context, names: list[str]) -> dict[str, dict]:
    results = {}
    for name in names:
        start = time.perf_counter()
        try:
            figures = SECTIONS[name](ctx)
            status = "SKIP" if figures is None else "PASS"
            results[name] = {"status": status, "figures": figures or {}}
        except Exception as exc:  # every failure is reported, then the next section runs
            results[name] = {"status": "FAIL", "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
        results[name]["seconds"] = time.perf_counter() - start
        print_section(name, results[name])
    return results


def print_section(name: str, result: dict) -> None:
    print(f"[{result['status']}] {name} ({result['seconds']:.1f} s)", flush=True)
    for key, value in result.get("figures", {}).items():
        print(f"    {key:40s} {value:.4g}" if isinstance(value, float) else f"    {key:40s} {value}", flush=True)
    if result["status"] == "FAIL":
        print("    " + result["error"], flush=True)
        print(result["trace"], file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="run every check with the CPU as the device (dry run)")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument(
        "--size", choices=("tiny", "bench"), help="checkpoint size (default: bench on CUDA, tiny on CPU)"
    )
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--model", type=Path, help="use this checkpoint instead of building one")
    parser.add_argument("--only", help="comma-separated sections (default: all): " + ",".join(SECTIONS))
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    device = torch.device("cpu" if args.cpu else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device visible; use --cpu for a dry run of the checks on the CPU")
    names = args.only.split(",") if args.only else list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    results = run_with_checkpoint(args, device, names)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    failed = [n for n, r in results.items() if r["status"] == "FAIL"]
    print(
        f"{len(results) - len(failed)} of {len(results)} sections passed or skipped"
        + (f"; FAILED: {failed}" if failed else "")
    )
    sys.exit(1 if failed else 0)


def run_with_checkpoint(args, device: torch.device, names: list[str]) -> dict[str, dict]:
    from models.tiny import write_tiny_checkpoint

    size = args.size or ("bench" if device.type == "cuda" else "tiny")
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        model = args.model or write_tiny_checkpoint(Path(tmp) / size, size=size, seed=0)
        print(
            f"checkpoint {model} ({size}) in {time.perf_counter() - start:.1f} s; device {device}, {dtype}", flush=True
        )
        ctx = Context(model, device, dtype, height=64, width=64, frames=9)
        return run_sections(ctx, names)


if __name__ == "__main__":
    main()
