"""What one rank of a worker group needs to join it: plain data, pickled into the spawned process.

A worker group is several processes (one per device) that run every unit together: rank 0 talks to
the engine and broadcasts each message, every rank runs it, rank 0 reports. Torch-free: the API
process builds these.
"""

from __future__ import annotations

import dataclasses
import socket
from dataclasses import dataclass
from typing import Any

from serve.engine.config import WorkersConfig


@dataclass(frozen=True)
class GroupArgs:
    """One rank's place in its group and where the group meets (`torch.distributed` rendezvous)."""

    devices: tuple[str, ...]
    """The device of each rank, rank 0 first."""
    ulysses: int
    """Ranks that split one forward's sequence (diffusers' Ulysses context parallelism)."""
    cfg: int
    """1, or 2: the conditional rows run on one half of the group, the unconditional on the other."""
    rank: int = 0
    address: str = ""
    """`tcp://127.0.0.1:PORT`, fresh for each (re)start of the group (`for_rank`)."""
    timeout_s: float = 600.0
    """How long a collective may wait for a peer before it fails (a dead peer's group is killed
    long before by the executor, which watches every rank's process)."""
    agree_timeout_s: float = 120.0
    """How long a rank waits for the others to compare how a unit went (`GroupWorker.agree`): the
    ranks end a unit within moments of each other, unless one is stuck in a collective that a
    rank which raised alone never joins; then the group exits and the executor restarts it."""

    def __post_init__(self) -> None:
        if self.ulysses * self.cfg != len(self.devices):
            raise ValueError(
                f"a group of ulysses={self.ulysses} x cfg={self.cfg} needs that many devices, not {len(self.devices)}"
            )

    @property
    def world_size(self) -> int:
        return len(self.devices)

    @property
    def device(self) -> str:
        return self.devices[self.rank]

    @property
    def leader(self) -> bool:
        """Rank 0: the one that receives units, writes videos and reports."""
        return self.rank == 0

    def for_rank(self, rank: int, address: str) -> GroupArgs:
        return dataclasses.replace(self, rank=rank, address=address)


def fresh_address() -> str:
    """A rendezvous address on a port free now: each (re)start of a group meets on a new one, so a
    restarted group never finds its dead predecessor's store."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def logical_workers(workers: list[Any], config: WorkersConfig) -> tuple[list[Any], list[GroupArgs | None]]:
    """One worker per group of `config.worker_groups()`: its rank 0's `WorkerArgs` (one per device
    in `workers`, in device order) and its `GroupArgs` (None: a single process)."""
    ulysses, cfg = config.degrees()
    size = ulysses * cfg
    if size == 1:
        return workers, [None] * len(workers)
    return workers[::size], [GroupArgs(devices, ulysses, cfg) for devices in config.worker_groups()]
