"""Quality and CPU speed of each quantization scheme against the unquantized model, same seeds, one run.

For each scheme: PSNR of decoded frames and cosine similarity of final latents against the fp32
output, and the median per-step denoise latency (with its ratio to fp32, measured side by side).
Then, as in ViDiT-Q's metric-decoupled analysis, each layer type is quantized alone (everything
else fp32) to show which types hurt most.

    python bench/quant_quality.py                      # builds the 'bench' checkpoint (hidden 768)
    python bench/quant_quality.py --model DIR --seeds 3 --steps 8

w8a8-fp8 runs through torch._scaled_mm even on CPU (torch 2.13 implements it there, slowly), so
its quality figures are those of the GPU path; its CPU latency is not a serving figure (on CPU
the server runs fp8 weight-only).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve.engine.request import GenerationParams  # noqa: E402
from serve.quant import DEFAULT_SKIP, Fp8Linear, QuantConfig, held_bytes, quantize_module  # noqa: E402
from serve.worker.model_runner import ModelRunner  # noqa: E402

SCHEMES = ("int8-wo", "w8a8-int8", "fp8-wo", "w8a8-fp8")
# Layer types of a Wan block, as regexes on module names (attn1: self-attention, attn2: cross-attention).
LAYER_TYPES = {
    "self-attn qkv": r"\.attn1\.to_[qkv]",
    "self-attn out": r"\.attn1\.to_out\.0",
    "cross-attn qkv": r"\.attn2\.to_[qkv]",
    "cross-attn out": r"\.attn2\.to_out\.0",
    "ffn up": r"\.ffn\.net\.0\.proj",
    "ffn down": r"\.ffn\.net\.2",
}
PROMPTS = ("a red square moving left", "a blue bird over the sea at night", "a white cat in a green forest")


def run(runner: ModelRunner, params: GenerationParams) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Final latents, decoded frames, and the seconds of each denoise step."""
    (state,) = runner.start([params])
    times = []
    for expert in runner.experts_of(state):
        start = time.perf_counter()
        runner.denoise_step([state], expert)
        times.append(time.perf_counter() - start)
    return state.latents, runner.decode(state.latents), times


def quantized_copy(expert: torch.nn.Module, config: QuantConfig) -> torch.nn.Module:
    """A quantized deep copy; W8A8 fp8 forced through _scaled_mm so its numerics are the GPU's."""
    model = copy.deepcopy(expert)
    quantize_module(model, config)
    for layer in model.modules():
        if isinstance(layer, Fp8Linear):
            layer.force_scaled_mm = True
    return model


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1.0 / ((a - b) ** 2).mean().clamp(min=1e-20)))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def compare(runner, experts, params_list, reference) -> tuple[float, float, float]:
    """Median PSNR, min cosine and median step seconds of `experts` over the seeds."""
    floats, runner.denoise.experts = runner.denoise.experts, experts
    try:
        psnrs, cosines, steps = [], [], []
        for params, (ref_latents, ref_frames, _) in zip(params_list, reference, strict=True):
            latents, frames, times = run(runner, params)
            psnrs.append(psnr(frames, ref_frames))
            cosines.append(cosine(latents, ref_latents))
            steps += times
    finally:
        runner.denoise.experts = floats
    return statistics.median(psnrs), min(cosines), statistics.median(steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="checkpoint dir (default: write the 'bench' one)")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--size", type=int, default=192, help="height and width in pixels")
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--sensitivity-scheme", default="w8a8-int8")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or _write_bench(Path(tmp))
        report(model, args)


def _write_bench(tmp: Path) -> Path:
    from models.tiny import write_tiny_checkpoint

    print("writing the 'bench' checkpoint (hidden 768, 4 layers, ffn 3072) ...", file=sys.stderr)
    return write_tiny_checkpoint(tmp / "wan-bench", size="bench")


def report(model: Path, args) -> None:
    runner = ModelRunner.from_checkpoint(model)
    params_list = [
        GenerationParams(
            PROMPTS[i % 3], "blurry, static", args.size, args.size, args.frames, 16, args.steps, 4.0, 3.0, 1000 + i
        )
        for i in range(args.seeds)
    ]
    run(runner, params_list[0])  # warm-up: first-call allocations
    reference = [run(runner, p) for p in params_list]
    base = statistics.median(t for _, _, times in reference for t in times)
    floats = runner.denoise.experts
    fp32_bytes = sum(held_bytes(e.blocks) for e in floats)
    print(
        f"model {model} | {args.size}x{args.size}x{args.frames}, {args.steps} steps, CFG, {args.seeds} seeds, fp32 CPU"
    )
    print(f"{'scheme':<12}{'PSNR dB':>9}{'cos(lat)':>11}{'step s':>9}{'vs fp32':>9}{'blocks MB':>11}")
    print(f"{'fp32':<12}{'ref':>9}{'1':>11}{base:>9.3f}{1.0:>9.2f}{fp32_bytes / 2**20:>11.1f}")
    for scheme in SCHEMES:
        experts = [quantized_copy(e, QuantConfig(scheme)) for e in floats]
        p, c, step = compare(runner, experts, params_list, reference)
        mb = sum(held_bytes(e.blocks) for e in experts) / 2**20
        print(f"{scheme:<12}{p:>9.1f}{c:>11.6f}{step:>9.3f}{step / base:>9.2f}{mb:>11.1f}")
    print(f"\nlayer types quantized alone ({args.sensitivity_scheme}; everything else fp32), worst first:")
    rows = []
    for name, pattern in LAYER_TYPES.items():
        only = QuantConfig(args.sensitivity_scheme, DEFAULT_SKIP + (rf"^(?!.*{pattern}$)",))
        experts = [quantized_copy(e, only) for e in floats]
        p, c, _ = compare(runner, experts, params_list, reference)
        rows.append((p, c, name))
    for p, c, name in sorted(rows):
        print(f"  {name:<16}{p:>8.1f} dB  cos {c:.6f}")


if __name__ == "__main__":
    main()
