"""The engine's part of the config tree: the worker processes (`WorkersConfig`) and the
scheduler's policies and caps (`SchedulerConfig`). Pure Python, like the scheduler."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from serve.frozen import FrozenConfig, flag

DType = Literal["float32", "bfloat16", "float16"]


class WorkersConfig(FrozenConfig):
    """The worker processes: which devices, how many, and the dtype they load the model in."""

    device: str = "cpu"
    """Torch device the workers run the model on, e.g. `cpu` or `cuda:0` (`--device`)."""
    devices: tuple[str, ...] = Field((), json_schema_extra=flag("--devices", metavar="cuda:0,cuda:1|auto"))
    """One worker process per device (`--devices cuda:0,cuda:1`, or `auto`: every visible GPU, else one
    CPU worker); empty: `count` workers on `device`."""
    count: int = Field(1, ge=1, le=64, json_schema_extra=flag("--workers"))
    """Worker processes on `device` when `devices` is empty (`--workers N`, for CPU machines; they split
    the cores)."""
    dtype: DType | None = None
    """Weight and activation dtype of the model in the workers (`--dtype`); none given: bfloat16 on a GPU,
    float32 on the CPU (filled in when the config is built, so it is never None after)."""
    start_timeout_s: float = Field(600.0, gt=0, json_schema_extra=flag("--worker-start-timeout-s"))
    """How long a worker may take to load the model before startup fails."""
    parallel: str = Field("none", json_schema_extra=flag("--parallel", metavar="ulysses=U,cfg=C|auto|none"))
    """Run each request on a group of U x C devices (`--parallel ulysses=2,cfg=2`): Ulysses splits the
    sequence U ways, CFG-parallel runs the conditional and unconditional rows on two halves. The worker
    processes are split into groups of that size, one logical worker each; `auto`: one group of every
    worker, with cfg=2 when their number is even; `none`: one process per worker."""

    @model_validator(mode="before")
    @classmethod
    def _dtype_for_the_device(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("dtype") is None:
            data = {**data, "dtype": "float32" if str(data.get("device", "cpu")) == "cpu" else "bfloat16"}
        return data

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        kind = value.split(":", 1)[0]
        if kind not in ("cpu", "cuda", "mps", "xpu"):
            raise ValueError(f"device {value!r} is not a torch device; use cpu, cuda or cuda:N")
        return value

    @field_validator("parallel")
    @classmethod
    def _parallel_degrees(cls, value: str) -> str:
        if value in ("none", "auto"):
            return value
        ulysses, cfg = parse_parallel(value)
        return f"ulysses={ulysses},cfg={cfg}"

    def worker_devices(self) -> list[str]:
        """The device of each worker process."""
        return list(self.devices) or [self.device] * self.count

    def degrees(self) -> tuple[int, int]:
        """(ulysses, cfg) of every worker group; (1, 1): no groups."""
        if self.parallel == "none":
            return 1, 1
        if self.parallel == "auto":
            n = len(self.worker_devices())
            return (n // 2, 2) if n % 2 == 0 else (n, 1)
        return parse_parallel(self.parallel)

    def worker_groups(self) -> list[tuple[str, ...]]:
        """The devices of each logical worker: consecutive runs of ulysses x cfg devices."""
        devices, (ulysses, cfg) = self.worker_devices(), self.degrees()
        size = ulysses * cfg
        if len(devices) % size:
            raise ValueError(
                f"--parallel {self.parallel} makes groups of {size} devices, which {len(devices)} workers "
                f"({','.join(devices)}) do not divide into; give a multiple of {size} devices or workers"
            )
        return [tuple(devices[i : i + size]) for i in range(0, len(devices), size)]

    @model_validator(mode="after")
    def _groups_fit(self) -> WorkersConfig:
        self.worker_groups()
        return self


def parse_parallel(text: str) -> tuple[int, int]:
    """`ulysses=U,cfg=C` (either may be left out: 1) -> (U, C)."""
    degrees = {"ulysses": 1, "cfg": 1}
    for part in text.split(","):
        name, _, number = part.strip().partition("=")
        if name not in degrees or not number.isdigit() or int(number) < 1:
            raise ValueError(f"--parallel {text!r}: write ulysses=U,cfg=C (U, C >= 1), auto or none")
        degrees[name] = int(number)
    if degrees["cfg"] > 2:
        raise ValueError(f"--parallel {text!r}: cfg is 1 or 2 (the conditional and unconditional halves)")
    return degrees["ulysses"], degrees["cfg"]


class SchedulerConfig(FrozenConfig):
    """Admission, batching and ordering of the work across requests and workers."""

    max_queue: int = Field(16, ge=1)
    """Requests that may wait for a worker (`--max-queue`); one more is refused with HTTP 429 and
    Retry-After."""
    max_batch_size: int = Field(8, ge=1, le=256)
    """Most requests in one denoising step (`--max-batch-size`; CFG doubles the transformer's rows)."""
    max_batch_cost_s: float | None = Field(None, gt=0)
    """Most predicted seconds for one batched step (`--max-batch-cost-s`); None: only max_batch_size
    bounds a batch."""
    max_running_per_worker: int = Field(8, ge=1)
    """Requests whose latents one worker holds at once (admission stops there)."""
    expert_policy: Literal["min-swap", "fcfs"] = "min-swap"
    """Order of denoising batches across MoE experts (`--expert-policy`): `min-swap` keeps running the
    expert a worker last used while any batch needs it; `fcfs` always serves the oldest request's batch."""
    max_wait_s: float = Field(30.0, gt=0)
    """Starvation bound under min-swap: a request idle this long is served next, whatever its expert."""
    request_timeout_s: float = Field(3600.0, gt=0)
    """A request not finished this long after arrival fails with a reason (`--request-timeout-s`)."""
