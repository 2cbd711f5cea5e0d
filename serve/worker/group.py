"""One request on several devices: a worker group's torch side.

Every rank holds the whole model and the same request states; a forward is split by diffusers'
own context parallelism (Ulysses: each rank takes a slice of the sequence, attention swaps heads
for sequence with all-to-alls, `proj_out` gathers) and, with `cfg=2`, by rows (the conditional
rows on one half of the group, the unconditional on the other, one all-gather per forward). So
each rank ends a step with the full velocity and the same latents, and the runner above runs
unchanged.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from serve.worker.group_args import GroupArgs

MESH_DIMS = ("cfg", "ring", "ulysses")  # diffusers' ContextParallelConfig slices "ring" and "ulysses"


def join(group: GroupArgs) -> dist.ProcessGroup:
    """Join the group's process group (NCCL between GPUs, gloo on the CPU) and return a gloo group
    for control messages (pickled objects, which NCCL would first copy to the device)."""
    backend = "nccl" if group.device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(group.device))
    dist.init_process_group(
        backend,
        init_method=group.address,
        rank=group.rank,
        world_size=group.world_size,
        timeout=datetime.timedelta(seconds=group.timeout_s),
    )
    return dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD


def agreement_group(group: GroupArgs) -> dist.ProcessGroup:
    """A gloo group of its own for comparing how each unit went, with a timeout of its own
    (`GroupArgs.agree_timeout_s`): a rank that waits there for a peer stuck elsewhere gives up."""
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=group.agree_timeout_s))


def build_mesh(group: GroupArgs) -> DeviceMesh:
    device_type = torch.device(group.device).type
    return init_device_mesh(device_type, (group.cfg, 1, group.ulysses), mesh_dim_names=MESH_DIMS)


def parallelize(runner: Any, group: GroupArgs, control: dist.ProcessGroup | None = None) -> bool:
    """Split every expert's forward across the group (both A14B experts alike), and with `control`
    the VAE decode's tiles; whether the tiles are spread (the decode is then a collective)."""
    if getattr(runner, "step_cache_threshold", None) is not None:
        # Each rank would judge "skip this block" from its own slice of the sequence, so ranks could
        # disagree and one would wait forever in a collective the others skipped.
        raise ValueError("the step cache cannot run in a worker group; drop --step-cache-threshold or --parallel")
    mesh = build_mesh(group)
    for expert in runner.denoise.experts:
        if group.ulysses > 1:
            enable_ulysses(expert, mesh)
        if group.cfg > 1:
            split = CfgSplit(mesh["cfg"].get_group(), group.cfg)
            split.install(expert)
            runner.denoise.local_rows = split.local_rows  # per-request LoRAs: the rows this rank runs
    return control is not None and spread_vae_tiles(runner, control)


def spread_vae_tiles(runner: Any, control: dist.ProcessGroup) -> bool:
    """Decode the VAE's spatial tiles across the group (tile k on rank k mod n), when the decode is
    tiled: the decoder's tile pool is swapped for one whose workers are the ranks."""
    decoder = getattr(getattr(runner, "decode", None), "decoder", None)
    config = getattr(decoder, "config", None)
    if decoder is None or getattr(config, "tile_sample_size", None) is None:
        return False
    decoder._pool.close()  # its threads: the ranks are the workers now
    decoder._pool = RankTilePool(control)
    return True


class RankTilePool:
    """`serve.vae.parallel.WorkerPool`'s interface over the ranks of a group: job k always runs on
    rank k mod n (a tile's causal cache stays where it was made), and every rank gets every result
    (all-gathered through the host: tiles differ in shape at the edges)."""

    def __init__(self, control: dist.ProcessGroup) -> None:
        self.control = control
        self.size, self.rank = dist.get_world_size(control), dist.get_rank(control)

    def map(self, fn, items):
        mine = {k: fn(0, item).cpu() for k, item in enumerate(items) if k % self.size == self.rank}
        merged: dict[int, torch.Tensor] = {}
        for part in gather(mine, self.control):
            merged.update(part)
        return [merged[k] for k in range(len(items))]

    def close(self) -> None:
        pass


def enable_ulysses(model: torch.nn.Module, mesh: DeviceMesh) -> None:
    """diffusers' context parallelism, Ulysses only (ring attention needs a backend that returns the
    log-sum-exp; `native` does not). `ulysses_anything`: diffusers' own handling of a sequence (or a
    head count) that does not divide by the degree, in uneven slices. Padding the sequence itself
    would let every token attend to the padding and change the output; only the gather of the
    uneven slices is padded (on gloo, below), and cropped back."""
    import transformers  # noqa: F401  diffusers' hooks call logger.warning_once, which transformers installs
    from diffusers import ContextParallelConfig

    config = ContextParallelConfig(ulysses_degree=mesh["ulysses"].size(), ulysses_anything=True, mesh=mesh)
    with _accelerator_count_at_least_one():
        model.enable_parallelism(config=config)
    if dist.get_backend(mesh["ulysses"].get_group()) == "gloo":
        _gather_uneven_slices_on_gloo()


def _gather_uneven_slices_on_gloo() -> None:
    """gloo's all_gather refuses tensors of different sizes, which `ulysses_anything` gathers when
    the sequence does not divide (NCCL accepts them): gather them padded to the longest slice and
    crop each back, so the result is the same tensor, byte for byte."""
    from diffusers.hooks import context_parallel

    context_parallel._all_gather_anything = _padded_all_gather


def _padded_all_gather(tensor: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    from diffusers.models._modeling_parallel import gather_size_by_comm

    sizes = gather_size_by_comm(tensor.shape[dim], group)
    padding = [0, 0] * (tensor.dim() - dim - 1) + [0, max(sizes) - tensor.shape[dim]]
    padded = torch.nn.functional.pad(tensor.contiguous(), padding)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part.narrow(dim, 0, size) for part, size in zip(parts, sizes, strict=True)], dim=dim)


@contextlib.contextmanager
def _accelerator_count_at_least_one() -> Iterator[None]:
    """diffusers 0.42 picks the model's device as `rank % torch.accelerator.device_count()`, which
    divides by zero on a host without accelerators; the device it picks is unused when a mesh is
    given, so one "device" is enough there."""
    count = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: max(1, count())
    try:
        yield
    finally:
        torch.accelerator.device_count = count


class CfgSplit:
    """CFG-parallel on one transformer: each half of the group runs half of the rows (the rows are
    [cond_1..cond_n; uncond_1..uncond_n]) and the halves are all-gathered back in order. A batch
    whose rows do not divide (CFG off, odd count) runs whole on every rank."""

    def __init__(self, group: dist.ProcessGroup, degree: int) -> None:
        self.group, self.degree = group, degree
        self.index = dist.get_rank(group)
        self.split = False

    def install(self, model: torch.nn.Module) -> None:
        model.register_forward_pre_hook(self.before, with_kwargs=True)
        model.register_forward_hook(self.after, with_kwargs=True)

    def local_rows(self, rows: int) -> slice | None:
        """Of a forward of `rows` rows, the ones this rank runs (None: all of them). The denoiser
        builds its per-request LoRA rows from the same slice, so the hooks index local rows."""
        if rows % self.degree != 0 or rows < self.degree:
            return None
        part = rows // self.degree
        return slice(self.index * part, (self.index + 1) * part)

    def before(self, module, args, kwargs):
        rows = kwargs["hidden_states"].shape[0]
        mine = self.local_rows(rows)
        self.split = mine is not None
        if mine is None:
            return None
        return args, {k: v[mine] if _has_rows(v, rows) else v for k, v in kwargs.items()}

    def after(self, module, args, kwargs, output):
        if not self.split:
            return output
        sample = output[0] if isinstance(output, tuple) else output.sample
        parts = [torch.empty_like(sample) for _ in range(self.degree)]
        dist.all_gather(parts, sample.contiguous(), group=self.group)
        whole = torch.cat(parts)
        if isinstance(output, tuple):
            return (whole, *output[1:])
        output.sample = whole
        return output


def _has_rows(value: Any, rows: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows


def broadcast(message: Any, control: dist.ProcessGroup) -> Any:
    """Rank 0's `message` on every rank."""
    box = [message]
    dist.broadcast_object_list(box, src=0, group=control)
    return box[0]


def gather(value: Any, control: dist.ProcessGroup) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    out: list[Any] = [None] * dist.get_world_size(control)
    dist.all_gather_object(out, value, group=control)
    return out


def barrier(control: dist.ProcessGroup) -> None:
    dist.barrier(group=control)


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
