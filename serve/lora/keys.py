"""LoRA tensor names -> (module of the diffusers `WanTransformer3DModel`, what the tensor is).

Two formats reach a server:
- original Wan naming, as Wan2.2-Lightning and LightX2V ship it:
  `diffusion_model.blocks.0.self_attn.q.lora_down.weight`, `.lora_up.weight`, `.alpha`, plus
  `.diff` (full weight delta) and `.diff_b` (bias delta);
- diffusers/PEFT: `transformer.blocks.0.attn1.to_q.lora_A.weight`, `.lora_B.weight` (`.lora_B.bias`).
The module renames are diffusers' `_convert_non_diffusers_wan_lora_to_diffusers`
(reference/wan22-formats.md 5.3). Whether the module exists is checked later against the model.
"""

from __future__ import annotations

import re

PREFIXES = ("diffusion_model.", "transformer.")

# Suffix -> kind. Longest first so ".lora_B.bias" is not read as ".bias".
SUFFIXES = (
    (".lora_down.weight", "down"),
    (".lora_A.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_B.weight", "up"),
    (".lora_B.bias", "diff_b"),
    (".diff_b", "diff_b"),
    (".alpha", "alpha"),
    (".diff", "diff"),
)

# Original Wan module names -> diffusers ones; `{i}` is the block index.
_BLOCK_RENAMES = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    "cross_attn.k_img": "attn2.add_k_proj",
    "cross_attn.v_img": "attn2.add_v_proj",
    "cross_attn.norm_k_img": "attn2.norm_added_k",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
    "norm3": "norm2",  # Wan's cross-attention norm is diffusers' norm2
}
_TOP_RENAMES = {
    "head.head": "proj_out",
    "time_projection.1": "condition_embedder.time_proj",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
}
_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")


def parse_key(key: str) -> tuple[str, str] | None:
    """(diffusers module name, kind) for a LoRA tensor name, or None if the suffix is not a LoRA one."""
    name = key
    for prefix in PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    for suffix, kind in SUFFIXES:
        if name.endswith(suffix):
            return to_diffusers_module(name[: -len(suffix)]), kind
    return None


def to_diffusers_module(module: str) -> str:
    """Rename an original Wan module path; a diffusers path comes back unchanged."""
    block = _BLOCK.fullmatch(module)
    if block and block.group(2) in _BLOCK_RENAMES:
        return f"blocks.{block.group(1)}.{_BLOCK_RENAMES[block.group(2)]}"
    return _TOP_RENAMES.get(module, module)
