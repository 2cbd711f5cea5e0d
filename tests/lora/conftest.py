"""Generated LoRA files for the tiny checkpoint, in both key formats users have."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

# Original Wan module name -> diffusers module name, for the modules the test LoRAs cover.
BLOCK_MODULES = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}


def lora_tensors(model: torch.nn.Module, fmt: str, seed: int, rank: int = 4, alpha: float = 8.0) -> dict:
    """A random LoRA for every attention and FFN Linear of `model`, in `fmt` ("original" or "peft").

    "original" is Lightning's layout (lora_down/lora_up/alpha under `diffusion_model.`, Wan names);
    "peft" is diffusers' (lora_A/lora_B under `transformer.`, no alpha: scaling 1). Values are
    large enough (delta ~ 10% of the weights) that a LoRA left out would show in the frames.
    """
    gen = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    out = {}
    for i in range(len(model.blocks)):
        for wan, diffusers in BLOCK_MODULES.items():
            linear = modules[f"blocks.{i}.{diffusers}"]
            down = torch.randn(rank, linear.in_features, generator=gen) * 0.1
            up = torch.randn(linear.out_features, rank, generator=gen) * 0.1
            if fmt == "original":
                base = f"diffusion_model.blocks.{i}.{wan}"
                out |= {f"{base}.lora_down.weight": down, f"{base}.lora_up.weight": up}
                out[f"{base}.alpha"] = torch.tensor(alpha)
            else:
                base = f"transformer.blocks.{i}.{diffusers}"
                out |= {f"{base}.lora_A.weight": down, f"{base}.lora_B.weight": up}
    return out


def write_lora(path: Path, model: torch.nn.Module, fmt: str, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in lora_tensors(model, fmt, seed).items()}, str(path))
    return path
