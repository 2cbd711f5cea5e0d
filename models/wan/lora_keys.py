"""Wan's original LoRA module names -> diffusers' `WanTransformer3DModel` module names.

Wan2.2-Lightning and LightX2V ship LoRAs in the original Wan naming
(`diffusion_model.blocks.0.self_attn.q.lora_down.weight`); the renames are diffusers'
`_convert_non_diffusers_wan_lora_to_diffusers` (reference/wan22-formats.md 5.3). The shared LoRA
reader (serve/lora) strips prefixes and suffixes and asks this table for the module.
"""

from __future__ import annotations

import re

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


def to_diffusers_module(module: str) -> str:
    """Rename an original Wan module path; a diffusers path comes back unchanged."""
    block = _BLOCK.fullmatch(module)
    if block and block.group(2) in _BLOCK_RENAMES:
        return f"blocks.{block.group(1)}.{_BLOCK_RENAMES[block.group(2)]}"
    return _TOP_RENAMES.get(module, module)
