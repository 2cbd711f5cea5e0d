"""Pick the residency mode with the least transfer that fits the device and host budgets.

Candidates in order of transfer cost: `resident` (none), `expert-swap` from a host copy (one expert
per switch), from the shards (same, read from disk), `block-offload` from host (every block, every
step), from the shards. Within a mode the text encoder prefers the device, then swapping in while
encoding, then encoding on the host. The first candidate whose device peak and host bytes fit wins.

Within a residency mode, the denoising activations shrink before more weights move: CFG batched
with whole blocks, sequential (cond and uncond one after the other), batched with sequence-chunked
blocks (only where CFG must stay batched), sequential with chunked blocks (`ACTIVATION_LEVELS`;
each costs less than moving more weights every step).

Device peak = weights held on the device + max(denoise activations, VAE decode working set, the
text encoder when swapped in); the largest request comes from `serve.config.Limits`. A rank of a
worker group (`group` = (ulysses, cfg)) holds the whole model but 1/ulysses of the sequence's
activations, and with cfg=2 one of the two CFG rows. Budgets keep a
reserve for what we do not model: the CUDA context and allocator fragmentation on the device
(`DEVICE_RESERVE`), the OS and the Python process on the host (`HOST_RESERVE`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from serve.loader.config import parse_bytes
from serve.loader.memory_model import GIB, ModelStats
from serve.loader.residency import ResidencyConfig

log = logging.getLogger(__name__)

DEVICE_RESERVE = 1 * GIB
# Sequence chunks when chunking: past 4 the whole-sequence self-attention holds the peak (memory_model).
CHUNKS = 4
# (cfg mode, block chunks) in the order the planner tries them. Sequential CFG before chunked blocks:
# it holds less (22 vs 30 bytes per token and channel) and costs less (chunks run part of each block
# twice; bench/activation_memory.py), so batched+chunks is only reached when CFG must stay batched.
ACTIVATION_LEVELS = (("batched", 1), ("sequential", 1), ("batched", CHUNKS), ("sequential", CHUNKS))
HOST_RESERVE = 4 * GIB


@dataclass(frozen=True)
class Budget:
    """Bytes the model may use on the compute device and in host RAM."""

    device: int
    host: int


@dataclass(frozen=True)
class Plan:
    mode: str
    weights_dtype: str
    text_encoder: str
    offload_source: str
    device: int
    """Peak device bytes (weights + activations) of the largest request."""
    host: int
    """Host bytes held for offloaded weights and a host-side text encoder."""
    fits: bool
    cfg_mode: str = "batched"
    block_chunks: int = 1

    def config(self, prefetch_blocks: int = 1) -> ResidencyConfig:
        return ResidencyConfig(self.mode, prefetch_blocks, self.text_encoder, self.offload_source)

    def short(self) -> str:
        source = "(disk)" if self.offload_source == "disk" else ""
        te = {"device": "", "swap": ", TE swap", "cpu": ", TE cpu"}[self.text_encoder]
        cfg = ", CFG seq" if self.cfg_mode == "sequential" else ""
        chunks = f", {self.block_chunks} chunks" if self.block_chunks > 1 else ""
        return f"{self.mode}{source}{te}{cfg}{chunks}"


def _weights_on_device(stats: ModelStats, mode: str, wdtype: str, te: str, k: int) -> int:
    experts = stats.experts
    held = stats.vae.held[wdtype] + (stats.text_encoder.held["bf16"] if te == "device" else 0)
    if mode == "resident":
        return held + sum(e.held[wdtype] for e in experts)
    if mode == "expert-swap":
        return held + max(e.held[wdtype] for e in experts)
    return held + sum(e.nonblock(wdtype) for e in experts) + (k + 1) * max(e.max_block(wdtype) for e in experts)


def estimate(
    stats: ModelStats,
    mode: str,
    wdtype: str,
    te: str,
    source: str,
    size,
    k: int = 1,
    activations=("batched", 1),
    group: tuple[int, int] = (1, 1),
) -> tuple[int, int]:
    """(device peak, host bytes) of one configuration for a request of `size` = (height, width, frames);
    `activations` = (cfg mode, block chunks); `group` = (ulysses, cfg) of the worker group, per rank."""
    height, width, frames = size
    cfg_mode, chunks = activations
    ulysses, cfg_parallel = group
    rows = 2 if cfg_mode == "batched" and cfg_parallel == 1 else 1
    denoise = stats.activation_bytes(height, width, frames, rows, chunks, ulysses)
    working = max(denoise, stats.vae_decode_bytes(height, width))
    if te == "swap":
        working = max(working, stats.text_encoder.held["bf16"])
    device = _weights_on_device(stats, mode, wdtype, te, k) + working
    host = stats.text_encoder.held["bf16"] if te != "device" else 0
    if mode != "resident" and source == "host":
        host += sum(e.held[wdtype] for e in stats.experts)  # the manager keeps a host copy of every expert
    return device, host


def lane_fits(
    stats: ModelStats, budget: Budget, size, wdtype: str, activations=("batched", 1), group: tuple[int, int] = (1, 1)
) -> bool:
    """Whether every weight fits on the device with a denoising step and a decode at once: the decode
    lane (`--vae-overlap`) runs the two together, where a plan's peak counts only the larger."""
    device, _ = estimate(stats, "resident", wdtype, "device", "host", size, 1, activations, group)
    return device + stats.vae_decode_bytes(size[0], size[1]) + DEVICE_RESERVE <= budget.device


def candidates(
    stats: ModelStats,
    budget: Budget,
    size,
    k: int = 1,
    wdtypes=("bf16", "fp8", "int8"),
    levels=ACTIVATION_LEVELS,
    group: tuple[int, int] = (1, 1),
) -> list[Plan]:
    """Every configuration in preference order, with its numbers and whether it fits."""
    modes = [("resident", "host"), ("expert-swap", "host"), ("expert-swap", "disk")]
    modes += [("block-offload", "host"), ("block-offload", "disk")]
    if len(stats.experts) < 2:
        modes = [m for m in modes if m[0] != "expert-swap"]  # one expert: nothing to swap
    plans = []
    for wdtype in wdtypes:
        for mode, source in modes:
            for cfg_mode, chunks in levels:
                for te in ("device", "swap", "cpu"):
                    device, host = estimate(stats, mode, wdtype, te, source, size, k, (cfg_mode, chunks), group)
                    fits = device + DEVICE_RESERVE <= budget.device and host + HOST_RESERVE <= budget.host
                    plans.append(Plan(mode, wdtype, te, source, device, host, fits, cfg_mode, chunks))
    return plans


def activation_levels(cfg_mode: str = "auto", block_chunks: int = 0) -> tuple[tuple[str, int], ...]:
    """The (cfg mode, block chunks) levels `--cfg-mode` and `--block-chunks` leave to the planner
    (`auto` / 0: all of `ACTIVATION_LEVELS`)."""
    levels = [(c, n) for c, n in ACTIVATION_LEVELS if cfg_mode in ("auto", c)]
    if block_chunks:
        levels = [(c, block_chunks) for c in dict.fromkeys(c for c, _ in levels)]
    return tuple(levels)


def _allowed(p: Plan, mode: str, text_encoder: str) -> bool:
    return mode in ("auto", p.mode) and text_encoder in ("auto", p.text_encoder)


def plan(stats: ModelStats, budget: Budget, size, wdtype: str = "bf16", k: int = 1, mode: str = "auto") -> Plan | None:
    """The first fitting candidate for `wdtype` (restricted to `mode` unless auto), or None."""
    for p in candidates(stats, budget, size, k, (wdtype,)):
        if p.fits and mode in ("auto", p.mode):
            return p
    return None


def choose(
    stats: ModelStats,
    budget: Budget,
    size,
    wdtype: str,
    k: int,
    mode: str,
    text_encoder: str,
    cfg_mode: str = "auto",
    block_chunks: int = 0,
    group: tuple[int, int] = (1, 1),
) -> Plan:
    """The planner's choice honoring `--memory-mode`, `--text-encoder-device`, `--cfg-mode` and
    `--block-chunks`, for one rank of a worker group of `group` = (ulysses, cfg); logs the numbers."""
    levels = activation_levels(cfg_mode, block_chunks)
    plans = [p for p in candidates(stats, budget, size, k, (wdtype,), levels, group) if _allowed(p, mode, text_encoder)]
    chosen = next((p for p in plans if p.fits), None)
    if chosen is None:
        best = min(plans, key=lambda p: p.device)
        raise ValueError(
            f"no memory mode fits {size[1]}x{size[0]}x{size[2]} frames in {budget.device / GIB:.1f} GiB of device and "
            f"{budget.host / GIB:.1f} GiB of host memory (smallest: {best.short()} needs {best.device / GIB:.1f} GiB "
            f"device, {best.host / GIB:.1f} GiB host); lower --max-height/--max-width/--max-num-frames, "
            "use --weights-dtype fp8, or allow --memory-mode auto and --cfg-mode auto"
        )
    log.info(
        "memory plan: %s (%s weights, text encoder %s, offload source %s, CFG %s, %d block chunks): device peak "
        "%.2f GiB of %.2f, host %.2f GiB of %.2f, for %dx%dx%d frames",
        chosen.mode, wdtype, chosen.text_encoder, chosen.offload_source, chosen.cfg_mode, chosen.block_chunks,
        chosen.device / GIB,
        budget.device / GIB, chosen.host / GIB, budget.host / GIB, size[1], size[0], size[2],
    )  # fmt: skip
    return chosen


def measure_budget(vram: str | None, ram: str | None, measure: bool = True, device: str = "cuda:0") -> Budget:
    """The budget from `--vram`/`--ram` text when given, else measured on `device` and the host."""
    return Budget(_device_budget(vram, measure, device), _host_budget(ram, measure))


def _device_budget(text: str | None, measure: bool, device: str) -> int:
    if text is not None:
        return parse_bytes(text, "--vram")
    import torch

    if measure and device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.mem_get_info(torch.device(device))[0]
    return 2**62  # no budget given or measurable (CPU): unbounded


def _host_budget(text: str | None, measure: bool) -> int:
    if text is not None:
        return parse_bytes(text, "--ram")
    if measure:
        import psutil

        return psutil.virtual_memory().available
    return 2**62
