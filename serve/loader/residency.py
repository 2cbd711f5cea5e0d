"""Which weights sit on the compute device, with an exact ledger of their bytes.

Modes (`ResidencyConfig.mode`):
- `resident`: everything stays where the loader put it (the device).
- `expert-swap`: one MoE expert on the device. During the last forward pass before a switch (the
  step's second with sequential CFG), each block of the outgoing expert is evicted right after it
  runs and the same block of the incoming expert is transferred in the background, so the device
  never holds more than one expert and the transfer overlaps the rest of that step.
- `block-offload`: non-block weights of every expert stay on the device; transformer blocks stream
  through a window of `prefetch_blocks + 1` (forward pre-hooks load block i..i+k, evict the rest).

A weight is "off the device" when its module slot holds a meta tensor of the same shape and dtype
(so `next(model.parameters()).dtype` still works) and its bytes live in a host copy (pinned on
CUDA) or, with `offload_source="disk"`, are re-read from the memory-mapped shards on demand.
Eviction is free: weights are immutable, so nothing is copied back. The ledger adds a unit's bytes
when its tensors are placed and subtracts them when they are replaced by meta tensors, so it can
be checked against the real tensors at any moment (`actual_device_bytes`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

Mode = Literal["resident", "expert-swap", "block-offload"]
MODES: tuple[str, ...] = ("resident", "expert-swap", "block-offload")
TextEncoderPlace = Literal["device", "swap", "cpu"]
Transfer = Callable[[torch.Tensor, torch.device], torch.Tensor]


@dataclass(frozen=True)
class ResidencyConfig:
    """How weights are placed between the compute device and host memory."""

    mode: Mode = "resident"
    """resident | expert-swap | block-offload (see the module docstring)."""
    prefetch_blocks: int = 1
    """block-offload: blocks loaded ahead of the running one (device holds k + 1 blocks)."""
    text_encoder: TextEncoderPlace = "device"
    """device: always there; swap: on the device only while encoding; cpu: encodes on the host."""
    offload_source: Literal["host", "disk"] = "host"
    """Where offloaded expert weights come back from: a host copy, or the safetensors shards
    (when host RAM cannot hold them; slower, but costs no RAM beyond the page cache)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"--memory-mode {self.mode!r} is unknown; choose one of {', '.join(MODES)}")
        if self.prefetch_blocks < 0:
            raise ValueError(f"prefetch_blocks={self.prefetch_blocks} must be >= 0")
        if self.text_encoder not in ("device", "swap", "cpu"):
            raise ValueError(f"--text-encoder-device {self.text_encoder!r} is unknown; use device, swap or cpu")


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def default_transfer(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host copy -> compute device. Same device (CPU): a distinct copy, so the bytes are really new."""
    if t.device == device:
        return t.clone()
    return t.to(device, non_blocking=t.is_pinned())


def to_host(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The host copy of a loaded tensor: pinned when the device is CUDA (async copies need it)."""
    host = t.to("cpu")
    if device.type == "cuda":
        host = host.pin_memory()
    return host


Slot = tuple[nn.Module, str, bool]  # (owner module, leaf name, is_buffer)
Slots = list[Slot]  # every place one tensor sits (tied weights sit in several)


def module_slots(module: nn.Module) -> dict[str, Slots]:
    """Every distinct parameter and buffer of `module` by its first full name, with all its places."""
    slots: dict[str, Slots] = {}
    first: dict[int, str] = {}
    for name, sub in module.named_modules(remove_duplicate=False):
        for table, is_buffer in ((sub._parameters, False), (sub._buffers, True)):
            for leaf, t in table.items():
                if t is not None:
                    key = first.setdefault(id(t), f"{name}.{leaf}" if name else leaf)
                    if (sub, leaf, is_buffer) not in slots.setdefault(key, []):
                        slots[key].append((sub, leaf, is_buffer))
    return slots


def get_slot(slots: Slots) -> torch.Tensor:
    owner, leaf, is_buffer = slots[0]
    return (owner._buffers if is_buffer else owner._parameters)[leaf]


def set_slot(slots: Slots, tensor: torch.Tensor) -> None:
    param = nn.Parameter(tensor, requires_grad=False)  # one Parameter object for tied names
    for owner, leaf, is_buffer in slots:
        if is_buffer:
            owner._buffers[leaf] = tensor
        else:
            owner._parameters[leaf] = param


@dataclass(eq=False)
class Unit:
    """A group of tensors moved together: a whole expert, its non-block part, one block, the text encoder."""

    name: str
    owner: str
    slots: dict[str, Slots]
    host: dict[str, torch.Tensor]
    """Host copies; with a disk source only of tensors the shards do not hold (rope tables)."""
    nbytes: int
    source: DiskSource | None = None
    state: Literal["off", "loading", "on"] = "off"
    future: Future | None = None


class DiskSource:
    """Re-reads an expert's tensors from its shards (the loader's index), casting or quantizing them
    to the dtype of the meta placeholder, so a re-read tensor is bit-identical to the first load."""

    def __init__(self, component_dir: Path, prefix: str) -> None:
        from serve.loader.index import CheckpointIndex

        self.index, self.prefix = CheckpointIndex.from_dir(component_dir), prefix

    def holds(self, full: str) -> bool:
        """Whether the shards can give this tensor back (itself, or the weight its scale derives from)."""
        name = full.removeprefix(self.prefix)
        return name in self.index.tensors or name.removesuffix("_scale") in self.index.tensors

    def read(self, unit: Unit) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        from serve.quant.ops import quantize_weight

        out: dict[str, torch.Tensor] = {}
        for full, slot in unit.slots.items():
            name, like = full.removeprefix(self.prefix), get_slot(slot)
            if full in out or full in unit.host or name not in self.index.tensors:
                continue  # kept on the host, or a derived scale filled with its weight below
            info = self.index.tensors[name]
            with safe_open(info.file, framework="pt", device="cpu") as f:
                stored = f.get_tensor(name)
            scale_name = full.removesuffix("weight") + "weight_scale"
            if (
                like.dtype in (torch.int8, torch.float8_e4m3fn)
                and stored.is_floating_point()
                and scale_name in unit.slots
            ):
                out[full], out[scale_name] = quantize_weight(stored, like.dtype)
            else:
                out[full] = stored.to(like.dtype, copy=True)
        missing = set(unit.slots) - set(out) - set(unit.host)
        if missing:
            raise RuntimeError(f"{unit.name}: {sorted(missing)[:3]} cannot be re-read from {self.index.source}")
        return out


class Ledger:
    """Bytes each component holds on the compute device; `peak` is the high-water mark since reset."""

    def __init__(self) -> None:
        self.by_owner: dict[str, int] = {}
        self.peak = 0
        self._lock = threading.Lock()

    @property
    def total(self) -> int:
        return sum(self.by_owner.values())

    def add(self, owner: str, nbytes: int) -> None:
        with self._lock:
            self.by_owner[owner] = self.by_owner.get(owner, 0) + nbytes
            self.peak = max(self.peak, self.total)

    def reset_peak(self) -> None:
        with self._lock:
            self.peak = self.total


@dataclass
class _Expert:
    name: str
    module: nn.Module
    units: list[Unit]  # [whole] in expert-swap without blocks, else [non-block, block 0, ...]
    blocks: list[Unit] = field(default_factory=list)
    nonblock: Unit | None = None


class ResidencyManager:
    """Places experts, blocks and the text encoder on `device` per `config`, keeping `ledger` exact.

    `transfer` copies a host tensor to the device (injectable: tests slow it down or count it);
    `executor` runs transfers in the background (default: one thread, so loads finish in order).
    """

    def __init__(
        self,
        config: ResidencyConfig,
        device: torch.device | str,
        transfer: Transfer = default_transfer,
        executor: Executor | None = None,
        on_event: Callable[[str, str], None] | None = None,
    ) -> None:
        self.config, self.device = config, torch.device(device)
        self.transfer = transfer
        self.executor = executor or ThreadPoolExecutor(1, thread_name_prefix="residency")
        self.ledger = Ledger()
        self.events: list[tuple[str, str]] = []
        self.on_event = on_event
        self.experts: list[_Expert] = []
        self.text_encoder: Unit | None = None
        self.fixed: dict[str, nn.Module] = {}
        self.active: int | None = None
        self.swaps = 0
        self._handoff: int | None = None  # expert index the running forward hands its blocks to
        self._next: int | None = None  # the expert the step after this one runs
        self._forwards_left = 0  # forward passes of this step still to start
        self._lock = threading.Lock()

    # ---- registration ----------------------------------------------------------------------------

    def add_fixed(self, name: str, module: nn.Module) -> None:
        """A component that never moves (the VAE; the text encoder in `device` placement)."""
        self.fixed[name] = module
        self.ledger.add(name, _real_bytes(module))

    def add_text_encoder(self, module: nn.Module) -> None:
        """Per `config.text_encoder`: fixed on the device, swapped in while encoding, or left on the host."""
        if self.config.text_encoder == "device":
            self.add_fixed("text_encoder", module)
        elif self.config.text_encoder == "swap":
            self.text_encoder = self._make_unit("text_encoder", "text_encoder", module_slots(module), None)

    def add_expert(self, name: str, module: nn.Module, component_dir: Path | None = None) -> None:
        """Register an expert loaded on the host (or, in resident mode, on the device)."""
        if self.config.mode == "resident":
            self.add_fixed(name, module)
            return
        source = DiskSource(component_dir, "") if self.config.offload_source == "disk" else None
        if source is not None and component_dir is None:
            raise ValueError("offload_source='disk' needs the expert's component directory")
        slots = module_slots(module)
        blocks = [{k: v for k, v in slots.items() if k.startswith(f"blocks.{i}.")} for i in range(len(module.blocks))]
        rest = {k: v for k, v in slots.items() if not k.startswith("blocks.")}
        nonblock = self._make_unit(f"{name}.nonblock", name, rest, source)
        units = [self._make_unit(f"{name}.blocks.{i}", name, b, source) for i, b in enumerate(blocks)]
        expert = _Expert(name, module, [nonblock, *units], units, nonblock)
        self.experts.append(expert)
        index = len(self.experts) - 1
        self._install_hooks(index, expert)
        if self.config.mode == "block-offload":
            self._load_now(nonblock)  # non-block weights stay resident in block-offload

    def _make_unit(self, name: str, owner: str, slots: dict[str, Slots], source: DiskSource | None) -> Unit:
        """Take the loaded tensors as the unit's host copy (or drop them: disk) and leave meta in their place."""
        host: dict[str, torch.Tensor] = {}
        nbytes = 0
        for full, slot in slots.items():
            t = get_slot(slot)
            nbytes += tensor_bytes(t)
            if source is None or not source.holds(full):
                host[full] = to_host(t, self.device)
            set_slot(slot, torch.empty_like(t, device="meta"))
        return Unit(name, owner, slots, host, nbytes, source=source)

    # ---- moving units ----------------------------------------------------------------------------

    def _event(self, kind: str, name: str) -> None:
        with self._lock:
            self.events.append((kind, name))
        if self.on_event is not None:
            self.on_event(kind, name)

    def _place(self, unit: Unit) -> None:
        """Copy the unit's tensors to the device and put them in their slots (runs on the executor)."""
        tensors = dict(unit.host)
        if unit.source is not None:
            tensors.update(unit.source.read(unit))
        with _copy_stream(self.device):
            placed = {full: self.transfer(t, self.device) for full, t in tensors.items()}
            _sync_copy_stream(self.device)
        for full, t in placed.items():
            set_slot(unit.slots[full], t)
        self.ledger.add(unit.owner, unit.nbytes)
        unit.state = "on"
        self._event("load_done", unit.name)

    def _load_async(self, unit: Unit) -> None:
        if unit.state != "off":
            return
        unit.state = "loading"
        self._event("load_start", unit.name)
        unit.future = self.executor.submit(self._place, unit)

    def _load_now(self, unit: Unit) -> None:
        self._load_async(unit)
        self._wait(unit, planned=True)

    def _wait(self, unit: Unit, planned: bool = False) -> None:
        """Block until a loading unit is on the device; an unplanned wait the step loop feels is a stall."""
        if unit.state == "off":
            self._load_async(unit)
        if unit.future is not None and not unit.future.done() and not planned:
            self._event("stall", unit.name)
        if unit.future is not None:
            unit.future.result()
            unit.future = None

    def _evict(self, unit: Unit) -> None:
        if unit.state == "off":
            return
        self._wait(unit)  # never drop a tensor a background copy is still writing
        for slot in unit.slots.values():
            set_slot(slot, torch.empty_like(get_slot(slot), device="meta"))
        self.ledger.add(unit.owner, -unit.nbytes)
        unit.state = "off"
        self._event("evict", unit.name)

    # ---- hooks -----------------------------------------------------------------------------------

    def _install_hooks(self, index: int, expert: _Expert) -> None:
        expert.module.register_forward_pre_hook(lambda m, a: self._before_forward(index, expert))
        expert.module.register_forward_hook(lambda m, a, o: self._after_forward(index))
        for i, block in enumerate(expert.module.blocks):
            block.register_forward_pre_hook(lambda m, a, i=i: self._before_block(index, i))
            block.register_forward_hook(lambda m, a, o, i=i: self._after_block(index, i))

    def _before_forward(self, index: int, expert: _Expert) -> None:
        # Only the step's last forward hands the blocks over: an earlier one (sequential CFG's cond
        # pass) would evict blocks that the next pass needs again.
        self._forwards_left -= 1
        if self.config.mode == "expert-swap" and self._forwards_left <= 0 and self._next not in (None, index):
            self._handoff = self._next
        self._wait(expert.nonblock)

    def _before_block(self, index: int, i: int) -> None:
        blocks = self.experts[index].blocks
        if self.config.mode == "block-offload":
            window = [(i + j) % len(blocks) for j in range(self.config.prefetch_blocks + 1)]
            for j, unit in enumerate(blocks):
                if j not in window:
                    self._evict(unit)  # evict first: the window never overlaps the blocks behind it
            for j in window:
                self._load_async(blocks[j])
        self._wait(blocks[i])

    def _after_block(self, index: int, i: int) -> None:
        if self._handoff is None or self._handoff == index:
            return
        self._evict(self.experts[index].blocks[i])  # this was its last use before the switch
        self._load_async(self.experts[self._handoff].blocks[i])

    def _after_forward(self, index: int) -> None:
        if self._handoff is None or self._handoff == index:
            return
        self._evict(self.experts[index].nonblock)
        self._load_async(self.experts[self._handoff].nonblock)
        self._handoff = None

    # ---- what the runner calls -------------------------------------------------------------------

    def before_step(self, expert: int, next_expert: int | None = None, forwards: int = 1) -> None:
        """Called before each denoising step with the expert it runs, the one the next step runs, and
        how many forward passes the step makes (2 with sequential CFG)."""
        if not self.experts:
            return
        if expert != self.active:
            self._switch_to(expert)
        # expert-swap: the last step before a switch hands each block over as soon as its last
        # forward has run it (`_before_forward` arms it).
        self._handoff, self._next, self._forwards_left = None, next_expert, forwards

    def _switch_to(self, expert: int) -> None:
        cold = self.active is None
        if not cold:
            self.swaps += 1
            self._event("switch", self.experts[expert].name)
        self.active = expert
        for index, other in enumerate(self.experts):
            if index != expert:
                units = other.blocks if self.config.mode == "block-offload" else other.units
                for unit in units:
                    self._evict(unit)
        if self.config.mode == "expert-swap":
            # Non-block first (the forward needs it first), then blocks in the order they run.
            for unit in self.experts[expert].units:
                self._load_async(unit)
        else:
            for unit in self.experts[expert].blocks[: self.config.prefetch_blocks + 1]:
                self._load_async(unit)
        if cold:  # the first load is start-up, not a stall of the step loop
            for unit in self.experts[expert].units:
                if unit.state == "loading":
                    self._wait(unit, planned=True)

    @contextmanager
    def encoding(self) -> Iterator[None]:
        """Around text encoding: in `swap` placement the encoder is on the device only inside."""
        if self.text_encoder is None:
            yield
            return
        self._load_now(self.text_encoder)
        try:
            yield
        finally:
            self._evict(self.text_encoder)

    # ---- checks ----------------------------------------------------------------------------------

    def modules(self) -> dict[str, nn.Module]:
        mods = dict(self.fixed)
        mods.update({e.name: e.module for e in self.experts})
        if self.text_encoder is not None:
            mods["text_encoder"] = next(iter(self.text_encoder.slots.values()))[0][0]
        return mods

    def actual_device_bytes(self) -> int:
        """Bytes of the distinct real tensors on the compute side right now (what the ledger must equal
        once no transfer is in flight: call `drain()` first)."""
        seen: dict[int, torch.Tensor] = {}
        for module in self._registered_roots():
            for t in (*module.parameters(), *module.buffers()):
                if not t.is_meta and t.device.type == self.device.type:
                    seen.setdefault(id(t), t)
        return sum(tensor_bytes(t) for t in seen.values())

    def _registered_roots(self) -> list[nn.Module]:
        roots = [*self.fixed.values(), *(e.module for e in self.experts)]
        if self.text_encoder is not None:
            roots += [slot[0][0] for slot in self.text_encoder.slots.values()]
        return roots

    def drain(self) -> None:
        """Wait for every background transfer (tests and shutdown; the step loop never calls it)."""
        units = [u for e in self.experts for u in e.units] + [self.text_encoder] * (self.text_encoder is not None)
        for unit in units:
            if unit.future is not None:
                unit.future.result()
                unit.future = None

    def close(self) -> None:
        self.drain()
        self.executor.shutdown(wait=True)


def _real_bytes(module: nn.Module) -> int:
    seen = {id(t): t for t in (*module.parameters(), *module.buffers()) if not t.is_meta}
    return sum(tensor_bytes(t) for t in seen.values())


_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _copy_stream(device: torch.device):
    """A side CUDA stream for background copies (so they overlap the step loop's kernels); CPU: none."""
    if device.type != "cuda":
        return nullcontext()
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return torch.cuda.stream(_STREAMS[device])


def _sync_copy_stream(device: torch.device) -> None:
    """On CUDA, wait for this thread's copies before the tensors are published to the step loop.

    The copies run on the executor thread's own (non-default) stream when set up by `transfer`;
    synchronizing here is the simple, correct choice: the step loop's stream never sees a half copy.
    """
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
