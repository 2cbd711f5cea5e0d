"""The memory model the planner plans with, from headers only: parameters, bytes on disk and bytes
held on a device per weight dtype for each component, plus an activation estimate.

Nothing here reads a weight: shapes and dtypes come from the safetensors headers
(`CheckpointIndex`), and which layers quantize comes from the module built on the meta device
from `config.json`. Held bytes follow the loader's rules: floats in bf16 except the modules the
class keeps in fp32, the VAE in fp32 (the runner's choice), and with fp8/int8 one byte per weight of
each quantizable expert linear (`serve.quant.swap.eligible_linears`) plus an fp32 scale per output row.

Activation estimate (an estimate, not a measurement), for one request at the largest size:
    tokens = latent_frames * (H / (vae_spatial * patch_h)) * (W / (vae_spatial * patch_w))
    denoise = 2 rows (CFG: cond and uncond in one pass) * tokens * (6 * hidden + 2 * ffn) * 2 bytes
      (x, normed x, q, k, v, attention out; FFN up and its GELU; flash attention: no tokens^2 matrix)
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

    def tokens(self, height: int, width: int, frames: int) -> int:
        from models.wan.spec import latent_tokens

        return latent_tokens(height, width, frames, self.vae_scale_temporal, self.vae_scale_spatial, self.patch_size)

    def activation_bytes(self, height: int, width: int, frames: int) -> int:
        cfg = self.experts[0].config
        hidden = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        return 2 * self.tokens(height, width, frames) * (6 * hidden + 2 * cfg["ffn_dim"]) * 2

    def vae_decode_bytes(self, height: int, width: int) -> int:
        base = self.vae.config.get("decoder_base_dim") or self.vae.config.get("base_dim", 96)
        return self.vae_scale_temporal * height * width * base * 4 * 4


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
    )
