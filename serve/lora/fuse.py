"""Fuse a LoRA into an expert's weights once, at load: the fast path for a server that serves one
distilled model (Lightning merges the same way, `W += (alpha/rank) * up @ down`, at load)."""

from __future__ import annotations

import torch

from serve.lora.weights import LoraWeights


@torch.no_grad()
def fuse_lora(model: torch.nn.Module, lora: LoraWeights, scale: float = 1.0) -> int:
    """Add `scale` times the LoRA's deltas to `model`'s parameters in place; returns modules changed.

    The delta is computed in fp32 and added to an fp32 copy of the weight, then cast back once,
    so a bf16 model is rounded once rather than once per term.
    """
    modules = dict(model.named_modules())
    for name, layer in lora.layers.items():
        module = modules[name]
        delta = layer.weight_delta()
        if delta is not None:
            _add(module.weight, scale * delta)
        if layer.diff_b is not None:
            _add(module.bias, scale * layer.diff_b)
    return len(lora.layers)


def _add(param: torch.Tensor, delta: torch.Tensor) -> None:
    param.copy_((param.float() + delta.to(param.device)).to(param.dtype))
