"""The ways bytes reach the module (zero-copy views, parallel readers, staging buffers) give the module
the serial copying loader gives, bit for bit; and each mode does what it says."""

import threading
from pathlib import Path

import pytest
import torch

from serve.loader import load as loader
from serve.loader import load_component
from serve.loader.readers import ReadUnit, read_all, split_units
from serve.loader.staging import StagedCopier

COMPONENTS = ("transformer", "vae", "text_encoder")
COPY = dict(readers=1, zero_copy=False, staged=False)  # the loader as it was: one reader, owned copies


def tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters(remove_duplicate=False)), **dict(module.named_buffers())}


def assert_same_module(got: torch.nn.Module, expected: torch.nn.Module) -> None:
    got_t, expected_t = tensors(got), tensors(expected)
    assert sorted(got_t) == sorted(expected_t)
    for name, tensor in expected_t.items():
        assert got_t[name].dtype == tensor.dtype and got_t[name].shape == tensor.shape, name
        assert torch.equal(got_t[name], tensor), name  # bit for bit: these are copies of the same bytes


def mapped_files() -> list[tuple[int, int, str]]:
    """(start, end, path) of every file mapping of this process."""
    rows = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            rows.append((start, end, fields[5]))
    return rows


def backing_file(tensor: torch.Tensor, maps: list[tuple[int, int, str]]) -> str | None:
    address = tensor.data_ptr()
    return next((path for start, end, path in maps if start <= address < end), None)


@pytest.mark.parametrize("component", COMPONENTS)
def test_zero_copy_equals_the_copying_loader(tiny_model_dir, component):
    assert_same_module(
        load_component(tiny_model_dir / component, zero_copy=True), load_component(tiny_model_dir / component, **COPY)
    )


def test_zero_copy_tensors_live_in_the_files_mapping_and_copies_do_not(tiny_model_dir):
    root = tiny_model_dir / "transformer"
    mapped = load_component(root, zero_copy=True)
    copied = load_component(root, **COPY)
    maps = mapped_files()
    weight = "blocks.0.attn1.to_q.weight"
    mapped_from = backing_file(dict(mapped.named_parameters())[weight], maps)
    assert mapped_from is not None and mapped_from.endswith(".safetensors") and str(root) in mapped_from
    assert backing_file(dict(copied.named_parameters())[weight], maps) is None
    # A cast is never a view: in bf16 every floating tensor is an owned copy.
    cast = load_component(root, dtype=torch.bfloat16, zero_copy=True)
    assert all(backing_file(p, maps) is None for p in cast.parameters() if p.dtype == torch.bfloat16)


def test_zero_copy_weights_can_be_changed_without_touching_the_file(tiny_model_dir, tmp_path):
    """The mapping is private (copy-on-write): fusing a LoRA into a loaded weight must not write the checkpoint."""
    shard_bytes = {p: p.read_bytes() for p in (tiny_model_dir / "vae").glob("*.safetensors")}
    vae = load_component(tiny_model_dir / "vae", zero_copy=True)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(1.0)
    assert {p: p.read_bytes() for p in shard_bytes} == shard_bytes


@pytest.mark.parametrize("component", COMPONENTS)
def test_parallel_readers_equal_one_reader(tiny_model_dir, component, monkeypatch):
    readers_seen: set[str] = set()
    read_one = loader._load_file

    def recording(*args, **kwargs):
        readers_seen.add(threading.current_thread().name)
        return read_one(*args, **kwargs)

    monkeypatch.setattr(loader, "_load_file", recording)
    monkeypatch.setattr(loader, "split_units", lambda plan, nbytes: split_units(plan, nbytes, unit_bytes=4096))
    parallel = load_component(tiny_model_dir / component, readers=3, zero_copy=False)
    assert len(readers_seen) > 1, "the load ran on one thread: nothing was read in parallel"
    assert_same_module(parallel, load_component(tiny_model_dir / component, **COPY))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_staged_copies_equal_direct_copies(tiny_model_dir, dtype, monkeypatch):
    """The staging path (pinned buffers on a side stream on CUDA) runs its buffer logic on the CPU here,
    with buffers small enough that every tensor larger than 256 bytes is cut into several round trips."""
    copiers: list[StagedCopier] = []

    def small_copier(device):
        copiers.append(StagedCopier(device, buffer_bytes=256))
        return copiers[-1]

    monkeypatch.setattr(loader, "StagedCopier", small_copier)
    root = tiny_model_dir / "transformer"
    staged = load_component(root, dtype=dtype, readers=2, staged=True)
    assert_same_module(staged, load_component(root, dtype=dtype, **COPY))
    largest = max(p.numel() * p.element_size() for p in staged.parameters())
    assert copiers and sum(c.chunks for c in copiers) >= largest // 256


def test_staged_copier_handles_every_dtype_and_size():
    copier = StagedCopier(torch.device("cpu"), buffer_bytes=64)
    cases = [
        torch.randn(3, 50),
        torch.zeros(0, 4),
        torch.arange(10),
        torch.tensor([True, False]),
        torch.randn(7).half(),
    ]
    for stored in cases:
        for dtype in (torch.float32, torch.bfloat16) if stored.is_floating_point() else (stored.dtype,):
            placed = copier(stored, torch.device("cpu"), dtype)
            assert placed.dtype == dtype and torch.equal(placed, stored.to(dtype))
            assert placed.data_ptr() != stored.data_ptr() or stored.numel() == 0


def test_units_cover_each_tensor_once_in_file_order_within_the_byte_bound():
    plan = {Path("a"): [("a0", 10), ("a1", 10), ("a2", 25), ("a3", 1)], Path("b"): [("b0", 5)]}
    units = split_units(plan, lambda item: item[1], unit_bytes=20)
    assert sorted(i for u in units for i in u.items) == sorted(i for items in plan.values() for i in items)
    for unit in units:
        assert all(item[0].startswith(unit.path.name) for item in unit.items)
        assert unit.nbytes <= 20 or len(unit.items) == 1  # only a single tensor may exceed the bound
        order = [plan[unit.path].index(item) for item in unit.items]
        assert order == sorted(order) and order == list(range(order[0], order[0] + len(order)))


def test_a_reader_error_reaches_the_caller_after_every_reader_stopped():
    finished: list[str] = []

    def read(unit: ReadUnit) -> None:
        if unit.path.name == "bad":
            raise OSError("disk gone")
        finished.append(unit.path.name)

    units = [ReadUnit(Path(name), (), 0) for name in ("x", "bad", "y", "z")]
    with pytest.raises(OSError, match="disk gone"):
        read_all(read, units, readers=2)
    assert sorted(finished) == ["x", "y", "z"]


def test_an_all_zero_copy_load_starts_no_reader_threads_and_a_cast_does(tiny_model_dir, monkeypatch):
    pools: list[int] = []
    read = loader.read_all
    monkeypatch.setattr(
        loader, "read_all", lambda fn, units, readers: pools.append(readers) or read(fn, units, readers)
    )
    load_component(tiny_model_dir / "transformer")  # fp32 stored, fp32 wanted: nothing to copy
    load_component(tiny_model_dir / "transformer", dtype=torch.bfloat16)
    assert pools[0] == 1
    assert pools[1] == loader.default_readers(10**6) and pools[1] >= 1
