"""Quantization schemes and the per-expert policy (`--quant high=w8a8-int8,low=none`).

A scheme fixes the stored weight format (int8 or fp8 e4m3, one fp32 scale per output channel)
and whether activations are quantized too (W8A8, per token, at run time). The policy says which
scheme each expert uses and which layers stay in floating point, and its `key()` is what goes
into the batch key: two requests can share a forward pass only on identically quantized weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

NONE = "none"
# Accepted for "keep this expert unquantized at --dtype", because `low=bf16` is how people write it.
NONE_ALIASES = ("none", "bf16", "fp16", "fp32", "float")


@dataclass(frozen=True)
class Scheme:
    """How one quantized linear stores its weight and runs its matmul."""

    name: str
    storage: torch.dtype
    """dtype of the stored weight; its per-output-channel scale is always fp32."""
    quantize_activations: bool
    """W8A8: activations quantized per token at run time (weight-only otherwise)."""


SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme("int8-wo", torch.int8, False),
        Scheme("w8a8-int8", torch.int8, True),
        Scheme("fp8-wo", torch.float8_e4m3fn, False),
        # W8A8 through torch._scaled_mm where the device has fp8 tensor cores (sm89+), weight-only elsewhere.
        Scheme("w8a8-fp8", torch.float8_e4m3fn, True),
    )
}

# Wan layers kept in floating point by default (ViDiT-Q keeps a few sensitive layers precise):
# the time and text embedders (condition_embedder.*, small and feeding every block's modulation),
# the output projection, and anything named like a norm. Regexes, matched with re.search.
DEFAULT_SKIP = (r"^condition_embedder\.", r"^proj_out$", r"norm")

# Short expert names accepted in --quant, mapped to the diffusers folder names.
EXPERT_ALIASES = {"high": "transformer", "low": "transformer_2", "all": "*"}


def scheme(name: str) -> Scheme:
    """The scheme called `name`; a clear error listing the valid ones otherwise."""
    if name not in SCHEMES:
        valid = ", ".join([*SCHEMES, *NONE_ALIASES])
        raise ValueError(f"unknown quantization scheme {name!r}; choose one of {valid}")
    return SCHEMES[name]


@dataclass(frozen=True)
class QuantConfig:
    """The quantization of one component: a scheme and the layers it leaves in floating point."""

    scheme: str
    skip: tuple[str, ...] = DEFAULT_SKIP

    def __post_init__(self) -> None:
        scheme(self.scheme)
        for pattern in self.skip:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"quantization skip pattern {pattern!r} is not a valid regex ({exc})") from None

    @property
    def spec(self) -> Scheme:
        return SCHEMES[self.scheme]

    def skips(self, module_name: str) -> bool:
        return any(re.search(p, module_name) for p in self.skip)

    def key(self) -> str:
        return f"{self.scheme}[skip={','.join(sorted(self.skip))}]"


@dataclass(frozen=True)
class QuantPolicy:
    """Scheme per expert folder (`transformer`, `transformer_2`); experts not listed stay unquantized."""

    experts: tuple[tuple[str, QuantConfig], ...]

    def for_expert(self, name: str) -> QuantConfig | None:
        return dict(self.experts).get(name)

    def key(self) -> str:
        """Stable, hashable description for the batch key, e.g. `transformer=w8a8-int8[skip=...];transformer_2=none`."""
        parts = [f"{name}={cfg.key()}" for name, cfg in sorted(self.experts)]
        return ";".join(parts) or NONE

    def check_no_fused_lora(self, expert_names: tuple[str, ...], lora: object | None) -> None:
        """A LoRA must be fused into float weights before they are quantized, not into int8 ones.

        `lora` is a `serve.lora.options.LoraOptions` (duck-typed: `.fused[i].expert` indexes `expert_names`).
        """
        for fused in getattr(lora, "fused", ()):
            name = expert_names[fused.expert] if fused.expert < len(expert_names) else None
            if name is not None and self.for_expert(name) is not None:
                raise ValueError(
                    f"cannot fuse LoRA {fused.path} into {name}: --quant quantizes it while loading, and a LoRA "
                    "must be fused into the float weights before quantizing (not supported yet); drop --quant "
                    "for that expert"
                )

    @classmethod
    def parse(
        cls, text: str, expert_names: tuple[str, ...] = ("transformer", "transformer_2"), skip: tuple[str, ...] = ()
    ) -> QuantPolicy:
        """`w8a8-int8` (every expert) or `high=w8a8-int8,low=none`; `skip` adds to DEFAULT_SKIP."""
        skips = DEFAULT_SKIP + tuple(skip)
        chosen: dict[str, str] = {}
        for item in filter(None, (p.strip() for p in text.split(","))):
            expert, _, name = item.rpartition("=")
            for target in _experts_named(expert or "all", expert_names, text):
                chosen[target] = name.strip()
        experts = tuple(
            (expert, QuantConfig(name, skips)) for expert, name in chosen.items() if name not in NONE_ALIASES
        )
        return cls(experts)


def _experts_named(expert: str, expert_names: tuple[str, ...], text: str) -> tuple[str, ...]:
    target = EXPERT_ALIASES.get(expert.strip(), expert.strip())
    if target == "*":
        return expert_names
    if target not in expert_names:
        valid = ", ".join([*EXPERT_ALIASES, *expert_names])
        raise ValueError(f"--quant {text!r}: unknown expert {expert!r}; use one of {valid}")
    return (target,)
