"""Where weights live: the memory mode (forced, or chosen per worker by `serve.loader.planner`),
the weight storage and the budgets the planner plans within. Torch-free: `reelserve inspect`,
`serve` and `generate` all take these flags, and the API process validates them."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from serve.frozen import FrozenConfig, flag

MemoryMode = Literal["auto", "resident", "expert-swap", "block-offload"]
WeightsDtype = Literal["bf16", "fp8", "int8"]
TextEncoderDevice = Literal["auto", "device", "swap", "cpu"]
CfgMode = Literal["auto", "batched", "sequential"]

UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12}
UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tb": 10**12, "tib": 2**40}


def parse_bytes(text: str, flag: str) -> int:
    """`24GiB`, `24GB`, `64g`, `512MiB` -> bytes; a clear error naming the flag otherwise."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match and match.group(2).lower()
    if not match or unit not in UNITS:
        raise ValueError(f"{flag} {text!r} is not a size; write a number with a unit, e.g. {flag} 24GiB or 24GB")
    return int(float(match.group(1)) * UNITS[unit])


class MemoryConfig(FrozenConfig):
    """Residency of the weights and the budgets the planner fits the largest request into."""

    mode: MemoryMode = Field("auto", json_schema_extra=flag("--memory-mode"))
    """Where weights live (`--memory-mode`): `auto` lets each worker's planner pick from its device's
    free memory and the largest request the limits allow; on a CPU, auto is resident."""
    weights_dtype: WeightsDtype = "bf16"
    """Weight storage (`--weights-dtype`); fp8/int8 quantize weight-only while loading (use `--quant`
    for W8A8 or per-expert choices)."""
    text_encoder_device: TextEncoderDevice = "auto"
    """Text encoder placement (`--text-encoder-device`): on the device, swapped in to encode, or on the CPU."""
    cfg_mode: CfgMode = "auto"
    """How classifier-free guidance runs (`--cfg-mode`): cond and uncond as one batch (`batched`, faster
    on a GPU), or one after the other (`sequential`, half the activation memory); `auto` lets the planner
    choose sequential only when batched does not fit; on a CPU it is sequential (faster there, as two
    forwards of B rows cost less than one of 2B), batched with the step cache or in a worker group."""
    block_chunks: int = Field(0, ge=0, le=64)
    """Run each transformer block's token-wise work (modulation, fp32 residuals, FFN) in this many
    sequence chunks (`--block-chunks`); 1: whole blocks; 0: the planner chooses (chunks only when
    memory is short; on a CPU, whole)."""
    prefetch_blocks: int = Field(1, ge=0)
    """Blocks loaded ahead under block-offload (`--prefetch-blocks`, k)."""
    vram: str | None = None
    """Device memory budget for the planner, e.g. `24GiB` (`--vram`); default: measured free memory."""
    ram: str | None = None
    """Host memory budget for the planner, e.g. `64GiB` (`--ram`); default: measured available memory."""

    @field_validator("vram", "ram")
    @classmethod
    def _is_size(cls, value: str | None, info) -> str | None:
        if value is not None:
            parse_bytes(value, f"--{info.field_name}")
        return value


def default_cfg_mode(device_type: str, step_cache: bool = False, group: tuple[int, int] = (1, 1)) -> str:
    """`--cfg-mode auto` where the planner does not choose (a CPU, a forced `--memory-mode`), and the
    runner's own default, so a server and `ModelRunner.generate` make the same frames. On a CPU, two
    forwards of B rows (cond, then uncond), as diffusers' WanPipeline runs them: one forward of 2B rows
    costs more there (the demo checkpoint, 8 requests, one thread: 1.90 s against 1.68 s for 20 bare
    forwards; the 8-request throughput bench 1.04-1.10x diffusers' batch against 0.93-1.02x batched).
    Elsewhere one batch (a GPU wants the larger GEMMs); the step cache needs it, and a group with
    CFG-parallel (`group` = (ulysses, cfg)) splits the CFG rows between its ranks its own way."""
    return "sequential" if device_type == "cpu" and not step_cache and group[1] == 1 else "batched"
