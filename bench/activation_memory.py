"""Denoising activations per CFG mode and block chunks: the estimate (`serve.loader.memory_model`) against
the measured peak of live bytes (`serve.loader.activation_meter`) of diffusers' Wan transformer on
this machine, and the time of each plan as a ratio to CFG batched with whole blocks (medians).

    python bench/activation_memory.py [--tokens-side 32] [--frames 4] [--repeats 3]

The transformer has A14B's head_dim (128) and FFN/hidden ratio (13824/5120) with 4 heads, bf16 as
on a GPU; its weights are random (activations do not depend on them). One CFG step: batched is one
forward over 2 rows, sequential two forwards over 1 row. The A14B figures at the end are the
estimate alone (what `reelserve inspect` prints), not a measurement.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import WanTransformer3DModel

from models.wan.chunked_block import set_block_chunks
from serve.loader.activation_meter import LiveBytes
from serve.loader.memory_model import GIB, denoise_activation_bytes
from serve.loader.planner import ACTIVATION_LEVELS

HEADS, HEAD_DIM, FFN = 4, 128, 1382


def build(num_layers: int = 2) -> torch.nn.Module:
    """A14B's head size and FFN ratio with 4 heads, bf16 (also the transformer tests/memory measures)."""
    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=16,
        out_channels=16, text_dim=64, freq_dim=32, ffn_dim=FFN, num_layers=num_layers, cross_attn_norm=True,
    )  # fmt: skip
    return model.to(torch.bfloat16).eval()


def cfg_step(model, latents, text, cfg_mode: str) -> None:
    """One CFG step's transformer work: 2 rows at once, or 1 row twice."""
    if cfg_mode == "batched":
        passes = [(torch.cat([latents, latents]), torch.cat([text, text]))]
    else:
        passes = [(latents, text), (latents, text)]
    for hidden, embeds in passes:
        t = torch.full((hidden.shape[0],), 500.0)
        model(hidden_states=hidden, timestep=t, encoder_hidden_states=embeds, return_dict=False)


def measure(model, latents, text, cfg_mode: str, chunks: int, repeats: int) -> tuple[int, float]:
    set_block_chunks(model, chunks)
    with torch.inference_mode():
        cfg_step(model, latents, text, cfg_mode)  # warm
        meter = LiveBytes()
        with meter:
            cfg_step(model, latents, text, cfg_mode)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            cfg_step(model, latents, text, cfg_mode)
            times.append(time.perf_counter() - start)
    set_block_chunks(model, 1)
    return meter.peak, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens-side", type=int, default=32, help="latent tokens per side after patching")
    parser.add_argument("--frames", type=int, default=4, help="latent frames")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    side, frames = args.tokens_side, args.frames
    tokens = frames * side * side
    model = build()
    latents = torch.randn(1, 16, frames, 2 * side, 2 * side, dtype=torch.bfloat16)
    text = torch.randn(1, 512, 64, dtype=torch.bfloat16)
    print(f"{tokens} tokens, hidden {HEADS * HEAD_DIM}, ffn {FFN}, bf16, {torch.get_num_threads()} threads")
    print(f"{'CFG':<11}{'chunks':>7}{'measured MiB':>14}{'estimate MiB':>14}{'est/meas':>10}{'time ratio':>12}")
    base_time = None
    for cfg_mode, chunks in ACTIVATION_LEVELS:
        peak, seconds = measure(model, latents, text, cfg_mode, chunks, args.repeats)
        rows = 2 if cfg_mode == "batched" else 1
        estimate = denoise_activation_bytes(tokens, HEADS * HEAD_DIM, FFN, HEAD_DIM, rows, chunks)
        base_time = base_time or seconds
        print(
            f"{cfg_mode:<11}{chunks:>7}{peak / 2**20:>14.1f}{estimate / 2**20:>14.1f}"
            f"{estimate / peak:>10.3f}{seconds / base_time:>12.3f}"
        )
    print("\nA14B estimate (inspect), GiB, CFG mode / block chunks:")
    for name, a14b_tokens in (("832x480x81", 21 * 30 * 52), ("1280x720x81", 21 * 45 * 80)):
        cells = []
        for cfg_mode, chunks in ACTIVATION_LEVELS:
            rows = 2 if cfg_mode == "batched" else 1
            nbytes = denoise_activation_bytes(a14b_tokens, 5120, 13824, 128, rows, chunks)
            cells.append(f"{cfg_mode}/{chunks} {nbytes / GIB:.2f}")
        print(f"  {name}: " + ", ".join(cells))


if __name__ == "__main__":
    main()
