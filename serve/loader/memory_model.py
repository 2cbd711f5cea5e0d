"""The memory model the planner plans with, from headers only: parameters, bytes on disk and bytes
held on a device per weight dtype for each component, plus an activation estimate.

Nothing here reads a weight: shapes and dtypes come from the safetensors headers
(`CheckpointIndex`), and which layers quantize comes from the module built on the meta device
from `config.json`. Held bytes follow the loader's rules: floats in bf16 except the modules the
class keeps in fp32, the VAE in fp32 (the runner's choice), and with fp8/int8 one byte per weight of
each quantizable expert linear (`serve.quant.swap.eligible_linears`) plus an fp32 scale per output row.

Activation estimate, for one request at the largest size (`denoise_activation_bytes`): the peak of
live activation bytes inside one diffusers `WanTransformerBlock.forward` with bf16 activations, per
token and per hidden channel, read off the code line by line (flash attention: no tokens^2 matrix):
    attention   15 = block input 2 + normed input 2 + q, k, v 6 + RoPE's rotated copies and temporaries
                     (counting each line gives 8 for these; the meter measures about 5: 15 covers it)
    FFN          8 + 4 * ffn/hidden = input 2 + residual 2 + normed 2 + cross-attention output 2
                     + the up-projection and its GELU
    residual    22 = input 2 + residual 2 + normed 2 + cross-attention output 2 + FFN output 2
                     + the fp32 path: residual.float() 4, ffn.float() 4, their gated product 4
per row (CFG batched runs 2 rows, sequential 1); with per-token timesteps (TI2V) also 16 for the
model's timestep projection and 24 for each block's fp32 modulation (48 while the block's entry
builds it); plus the fp32 RoPE table (cos and sin, head_dim each) shared by the rows and the text
side (the projected prompt, cross-attention's k and v).
With the block run in sequence chunks (`models/wan/chunked_block.py`) only the attention keeps its
full-sequence size; the rest is divided by the chunk count. Checked against the live bytes of
diffusers' Wan transformer on CPU (tests/memory/test_activation_model.py, bench/activation_memory.py).
VAE decode estimate:
    vae decode = vae_temporal * H * W * vae_base_dim * 4 bytes (fp32) * 4 (input, output, residual, causal cache)

`reelserve inspect` (models/inspect.py) prints it; torch is imported only to build modules on meta.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

WEIGHT_DTYPES = ("bf16", "fp8", "int8")
GIB = 2**30
GB = 10**9


@dataclass(frozen=True)
class ComponentStats:
    """One component folder: what is on disk and what it holds on a device per weight dtype."""

    name: str
    params: int
    disk_bytes: dict[str, int]
    held: dict[str, int]
    """weight dtype -> bytes when the whole component is on the device."""
    block_held: dict[str, list[int]] = field(default_factory=dict)
    """weight dtype -> bytes of each transformer block (experts only)."""
    config: dict = field(default_factory=dict)

    def nonblock(self, wdtype: str) -> int:
        return self.held[wdtype] - sum(self.block_held.get(wdtype, []))

    def max_block(self, wdtype: str) -> int:
        return max(self.block_held.get(wdtype, [0]))


@dataclass(frozen=True)
class ModelStats:
    root: str
    experts: list[ComponentStats]
    text_encoder: ComponentStats
    vae: ComponentStats
    vae_scale_spatial: int
    vae_scale_temporal: int
    patch_size: tuple[int, int, int]
    per_token_timesteps: bool = False
    """TI2V: every latent token has its own timestep (the first frame's are 0)."""

    def tokens(self, height: int, width: int, frames: int) -> int:
        from models.wan.spec import latent_tokens

        return latent_tokens(height, width, frames, self.vae_scale_temporal, self.vae_scale_spatial, self.patch_size)

    def activation_bytes(
        self, height: int, width: int, frames: int, cfg_rows: int = 2, chunks: int = 1, ulysses: int = 1
    ) -> int:
        """Denoising activations of one request on one device: `cfg_rows` 2 runs cond and uncond as one
        batch, 1 one after the other (or no CFG, or each on its half of a CFG-parallel group); `chunks` > 1
        runs each block's token-wise work in that many sequence chunks; `ulysses` ranks of a worker group
        each hold that share of the sequence (the attention, all-to-all'd to whole sequences, holds a
        share of the heads instead: the same bytes)."""
        cfg = self.experts[0].config
        hidden = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        tokens = -(-self.tokens(height, width, frames) // ulysses)  # uneven slices: the longest
        head_dim, per_token = cfg["attention_head_dim"], self.per_token_timesteps
        return denoise_activation_bytes(tokens, hidden, cfg["ffn_dim"], head_dim, cfg_rows, chunks, per_token)

    def vae_decode_bytes(self, height: int, width: int) -> int:
        base = self.vae.config.get("decoder_base_dim") or self.vae.config.get("base_dim", 96)
        return self.vae_scale_temporal * height * width * base * 4 * 4


# Bytes per token and hidden channel at each peak of `WanTransformerBlock.forward` (module docstring).
ATTENTION_PEAK = 15
RESIDUAL_PEAK = 22
BLOCK_INPUT = 2  # the bf16 hidden state the transformer's loop holds while a block runs
ROPE_TABLE = 2 * 4  # cos and sin, fp32, head_dim of each per token
TEXT_TOKENS = 512  # Wan pads every prompt to 512 tokens
TEXT_SIDE = 2 + 2 + 2  # per text token and channel: the projected prompt, cross-attention's k and v (bf16)
# Per-token timesteps (TI2V): each token carries its own six modulation vectors.
TIMESTEP_TABLE = 6 * 2 + 4  # the model's timestep projection (bf16) and time embedding (fp32), all blocks long
BLOCK_MODULATION = 6 * 4  # the block's fp32 table + temb.float(), held through the block
BLOCK_MODULATION_ENTRY = 2 * BLOCK_MODULATION  # while it is built: temb.float() and the sum


def ffn_peak(hidden: int, ffn: int) -> float:
    return 8 + 4 * ffn / hidden


def denoise_activation_bytes(
    tokens: int, hidden: int, ffn: int, head_dim: int, rows: int, chunks: int = 1, per_token_timesteps: bool = False
) -> int:
    """Peak activation bytes of one transformer forward over `rows` rows of `tokens` tokens each.

    The one place the activation estimate lives: a sequence-parallel group passes the tokens each
    rank holds. `chunks` > 1: the block's token-wise work (modulation, fp32 residuals, cross-attention,
    FFN) runs in sequence chunks, the self-attention still on the whole sequence. `per_token_timesteps`
    (TI2V): every token has its own modulation, built in fp32 at each block's entry."""
    held = BLOCK_MODULATION if per_token_timesteps else 0
    entry = BLOCK_MODULATION_ENTRY if per_token_timesteps else 0
    if chunks <= 1:
        block = max(ATTENTION_PEAK, ffn_peak(hidden, ffn), RESIDUAL_PEAK) + held
        per_token_channel = max(block, BLOCK_INPUT + entry)
    else:
        # attention output and the assembled block output stay whole; one chunk's transients on top
        whole = BLOCK_INPUT + 2 + 2
        chunk = max(RESIDUAL_PEAK, ffn_peak(hidden, ffn)) - BLOCK_INPUT + held
        per_token_channel = max(ATTENTION_PEAK, whole + chunk / chunks, whole + entry / chunks)
    if per_token_timesteps:
        per_token_channel += TIMESTEP_TABLE
    text = rows * TEXT_TOKENS * hidden * TEXT_SIDE
    return int(rows * tokens * hidden * per_token_channel) + tokens * head_dim * ROPE_TABLE + text


def component_stats(component_dir: str | Path, kind: str) -> ComponentStats:
    """Header-only statistics of one component; `kind` is expert, text_encoder or vae."""
    import torch

    from serve.loader.build import build_empty
    from serve.loader.config_check import open_component
    from serve.loader.index import DTYPE_BYTES
    from serve.loader.load import fp32_module_names
    from serve.quant.schemes import QuantConfig
    from serve.quant.swap import eligible_linears

    root = Path(component_dir)
    component, config, index = open_component(root)
    module = build_empty(component, config)
    keep = fp32_module_names(component, module, torch.bfloat16)
    quantizable = {f"{n}.weight" for n in eligible_linears(module, QuantConfig("int8-wo"), keep)}
    disk: dict[str, int] = {}
    held = dict.fromkeys(WEIGHT_DTYPES, 0)
    blocks: dict[str, list[int]] = {w: [0] * len(getattr(module, "blocks", [])) for w in WEIGHT_DTYPES}
    for info in index.tensors.values():
        disk[info.dtype] = disk.get(info.dtype, 0) + info.nbytes
        for wdtype in WEIGHT_DTYPES:
            nbytes = _held_bytes(info, kind, keep, wdtype, info.name in quantizable, DTYPE_BYTES)
            held[wdtype] += nbytes
            if kind == "expert" and info.name.startswith("blocks."):
                blocks[wdtype][int(info.name.split(".")[1])] += nbytes
    params = sum(math.prod(i.shape) for i in index.tensors.values())
    return ComponentStats(root.name, params, disk, held, blocks if kind == "expert" else {}, config)


def _held_bytes(info, kind: str, keep: frozenset[str], wdtype: str, quantizable: bool, sizes: dict) -> int:
    numel = math.prod(info.shape)
    if not info.dtype.startswith(("F", "BF")):
        return numel * sizes.get(info.dtype, 1)  # integer tensors keep their stored dtype
    if kind == "vae" or keep.intersection(info.name.split(".")):
        return numel * 4
    if kind == "expert" and wdtype != "bf16" and quantizable:
        return numel + info.shape[0] * 4  # 1-byte weight + one fp32 scale per output channel
    return numel * 2


def model_stats(model_dir: str | Path) -> ModelStats:
    from models.wan.spec import read_spec
    from serve.loader.config_check import open_components

    spec = read_spec(model_dir)  # experts, VAE strides and patch size, read as the engine reads them
    root = spec.model_dir
    # Every config against its headers before any component is built for its statistics.
    open_components([root / name for name in (*spec.expert_names, "text_encoder", "vae")])
    return ModelStats(
        str(root),
        [component_stats(root / n, "expert") for n in spec.expert_names],
        component_stats(root / "text_encoder", "text_encoder"),
        component_stats(root / "vae", "vae"),
        spec.vae_scale_spatial,
        spec.vae_scale_temporal,
        spec.patch_size,
        spec.expand_timesteps,
    )
