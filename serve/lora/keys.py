"""LoRA tensor names -> (module of the model, what the tensor is).

Two formats reach a server:
- original Wan naming, as Wan2.2-Lightning and LightX2V ship it:
  `diffusion_model.blocks.0.self_attn.q.lora_down.weight`, `.lora_up.weight`, `.alpha`, plus
  `.diff` (full weight delta) and `.diff_b` (bias delta);
- diffusers/PEFT: `transformer.blocks.0.attn1.to_q.lora_A.weight`, `.lora_B.weight` (`.lora_B.bias`).
A model family maps its original module names to the model's (`rename`, e.g.
models/wan/lora_keys.py). Whether the module exists is checked later against the model.
"""

from __future__ import annotations

from collections.abc import Callable

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

Rename = Callable[[str], str]


def parse_key(key: str, rename: Rename | None = None) -> tuple[str, str] | None:
    """(module name in the model, kind) for a LoRA tensor name, or None if the suffix is not a LoRA
    one. `rename` maps the file's module path to the model's (a family's naming, e.g.
    models/wan/lora_keys.py); None keeps it (diffusers/PEFT files already use the model's names)."""
    name = key
    for prefix in PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    for suffix, kind in SUFFIXES:
        if name.endswith(suffix):
            module = name[: -len(suffix)]
            return (rename(module) if rename else module), kind
    return None
