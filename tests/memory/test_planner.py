"""The planner picks the least-transfer mode that fits, and refuses clearly when nothing does."""

import pytest

from models.inspect import write_header_fixture
from serve.loader.memory_model import GB, GIB, model_stats
from serve.loader.planner import ACTIVATION_LEVELS, DEVICE_RESERVE, Budget, choose, estimate, parse_bytes, plan

SIZE = (720, 1280, 81)


@pytest.fixture(scope="module")
def a14b(tmp_path_factory):
    return model_stats(write_header_fixture(tmp_path_factory.mktemp("hdr") / "a14b", "Wan2.2-T2V-A14B"))


def test_parse_bytes() -> None:
    assert parse_bytes("24GiB", "--vram") == 24 * GIB and parse_bytes("64GB", "--ram") == 64 * GB
    with pytest.raises(ValueError, match="--vram '24XB'.*24GiB"):
        parse_bytes("24XB", "--vram")


def test_modes_order_by_device_bytes(a14b) -> None:
    """Resident > expert-swap > block-offload in device bytes, and the block-offload figure is
    non-block weights + 2 blocks (k=1), not a whole expert."""
    dev = {m: estimate(a14b, m, "bf16", "cpu", "host", SIZE)[0] for m in ("resident", "expert-swap", "block-offload")}
    assert dev["resident"] > dev["expert-swap"] > dev["block-offload"]
    e = a14b.experts[0]
    assert dev["expert-swap"] - dev["block-offload"] == e.held["bf16"] - 2 * e.nonblock("bf16") - 2 * e.max_block(
        "bf16"
    )


def test_plan_prefers_least_transfer(a14b) -> None:
    assert plan(a14b, Budget(80 * GB, 256 * GB), SIZE).mode == "resident"
    assert plan(a14b, Budget(48 * GB, 256 * GB), SIZE).mode == "expert-swap"
    assert plan(a14b, Budget(24 * GB, 256 * GB), SIZE).mode == "block-offload"
    # Too little host RAM for host copies of both experts: re-read from the shards.
    assert plan(a14b, Budget(48 * GB, 32 * GB), SIZE).offload_source == "disk"


def test_choose_honours_flags_and_explains_failure(a14b) -> None:
    chosen = choose(a14b, Budget(80 * GB, 256 * GB), SIZE, "bf16", 1, "block-offload", "cpu")
    assert (chosen.mode, chosen.text_encoder) == ("block-offload", "cpu")
    with pytest.raises(ValueError, match="no memory mode fits.*--max-height"):
        choose(a14b, Budget(8 * GB, 64 * GB), SIZE, "bf16", 1, "auto", "auto")


def test_each_worker_plans_for_its_own_device(tiny_model_dir):
    from serve.loader.config import MemoryConfig
    from serve.worker.factory import plan_memory

    model, small = str(tiny_model_dir), (64, 64, 9)
    assert plan_memory(model, "cpu", MemoryConfig(ram="64GiB"), small)[0] is None  # CPU: auto is resident
    roomy = plan_memory(model, "cuda:0", MemoryConfig(vram="80GiB", ram="64GiB"), small)[0]
    assert roomy.mode == "resident"
    forced = plan_memory(model, "cpu", MemoryConfig(mode="block-offload", prefetch_blocks=2), (1280, 1280, 129))[0]
    assert (forced.mode, forced.prefetch_blocks, forced.text_encoder) == ("block-offload", 2, "device")
    with pytest.raises(ValueError, match="no memory mode fits"):
        plan_memory(model, "cuda:0", MemoryConfig(vram="1MiB", ram="64GiB"), small)


def test_a14b_targets_on_consumer_cards(a14b) -> None:
    """Issue 17: A14B at 81 frames plans into 12 GiB at 480p and 24 GiB at 720p with fp8 block offload,
    shrinking activations (CFG sequential, chunked blocks) before anything else where needed."""
    for size, vram in (((480, 832, 81), 12), ((720, 1280, 81), 24)):
        chosen = choose(a14b, Budget(vram * GIB, 64 * GIB), size, "fp8", 1, "block-offload", "auto")
        assert chosen.fits and chosen.device + DEVICE_RESERVE <= vram * GIB
    # 720p in 12 GiB: only by running cond and uncond one after the other
    tight = choose(a14b, Budget(12 * GIB, 64 * GIB), SIZE, "fp8", 1, "block-offload", "auto")
    assert tight.cfg_mode == "sequential"


def test_activations_shrink_only_when_memory_is_short(a14b) -> None:
    roomy = plan(a14b, Budget(80 * GB, 256 * GB), SIZE)
    assert (roomy.cfg_mode, roomy.block_chunks) == ("batched", 1)
    device = {lv: estimate(a14b, "block-offload", "fp8", "cpu", "host", SIZE, 1, lv)[0] for lv in ACTIVATION_LEVELS}
    # each level tried after batched/1 holds less; the last one the least
    assert max(list(device.values())[1:]) < device["batched", 1]
    assert min(device.values()) == device[ACTIVATION_LEVELS[-1]]
    forced = choose(a14b, Budget(80 * GB, 256 * GB), SIZE, "bf16", 1, "auto", "auto", "sequential", 3)
    assert (forced.mode, forced.cfg_mode, forced.block_chunks) == ("resident", "sequential", 3)


@pytest.mark.parametrize(
    ("config", "phrase"),
    [
        (None, "resident"),
        (dict(mode="block-offload", prefetch_blocks=2), "block-offload, text encoder device, prefetch 2 blocks"),
        (
            dict(mode="expert-swap", text_encoder="swap", offload_source="disk"),
            "expert-swap, text encoder swap, idle expert from disk",
        ),
    ],
)
def test_the_ready_report_names_each_memory_plan(config, phrase):
    """Every residency mode gives its phrase: the Ready report is built after the load's try, so a
    mode it cannot describe kills the worker before it reports Ready."""
    from types import SimpleNamespace

    from serve.loader.residency import ResidencyConfig
    from serve.worker.worker import memory_plan

    manager = None if config is None else SimpleNamespace(config=ResidencyConfig(**config))
    assert memory_plan(SimpleNamespace(residency=manager)) == phrase


def test_the_decode_lane_needs_room_for_a_decode_beside_a_step_with_every_weight(a14b) -> None:
    """A plan's peak counts the larger of a step and a decode; the lane holds both at once."""
    from serve.loader.planner import lane_fits

    resident = estimate(a14b, "resident", "bf16", "device", "host", SIZE)[0]
    decode = a14b.vae_decode_bytes(SIZE[0], SIZE[1])
    just_resident = Budget(resident + DEVICE_RESERVE, 256 * GB)  # the resident plan fits, and no more
    assert plan(a14b, just_resident, SIZE).mode == "resident"
    assert not lane_fits(a14b, just_resident, SIZE, "bf16")
    assert lane_fits(a14b, Budget(resident + decode + DEVICE_RESERVE, 256 * GB), SIZE, "bf16")


def test_auto_asks_for_the_lane_only_on_a_cuda_device_that_keeps_every_weight(tiny_model_dir):
    from serve.loader.config import MemoryConfig
    from serve.worker.factory import plan_memory

    model, small = str(tiny_model_dir), (64, 64, 9)

    def fits(device: str, **memory) -> bool:
        return plan_memory(model, device, MemoryConfig(**memory), small, decode_lane=True).decode_lane_fits

    roomy = dict(vram="80GiB", ram="64GiB")
    assert fits("cuda:0", **roomy)
    assert fits("cuda:0", mode="resident", **roomy)
    assert not fits("cpu", **roomy)
    assert not fits("cuda:0", mode="block-offload", **roomy)
    assert not fits("cuda:0", text_encoder_device="swap", **roomy)
    assert not fits("cuda:0", mode="resident", vram="1MiB", ram="64GiB")
    assert not plan_memory(model, "cuda:0", MemoryConfig(**roomy), small).decode_lane_fits  # not asked for
