"""What a worker group changes in memory, per device, from the A14B headers (no weights read):
weights unchanged (every rank holds the whole model), activations divided by the Ulysses degree,
and one CFG row per rank under CFG-parallel; the planner plans one rank's share. Also the
`--parallel` field: how the devices split into groups, and the errors that name the fix."""

import json

import pytest
from pydantic import ValidationError

from models.inspect import main, write_header_fixture
from serve.config import ServerConfig
from serve.engine.config import WorkersConfig
from serve.loader.memory_model import GIB, model_stats
from serve.loader.planner import Budget, choose

SIZE_720P = (720, 1280, 81)


@pytest.fixture(scope="module")
def a14b(tmp_path_factory):
    return write_header_fixture(tmp_path_factory.mktemp("hdr") / "a14b", "Wan2.2-T2V-A14B")


def test_ulysses_divides_the_sequence_activations_and_cfg_parallel_the_rows(a14b):
    stats = model_stats(a14b)
    alone = stats.activation_bytes(*SIZE_720P)
    text = 2 * 512 * 5120 * 6  # the prompt side (2 rows) is not split by Ulysses
    for ulysses in (2, 4, 8):
        share = stats.activation_bytes(*SIZE_720P, ulysses=ulysses)
        assert share - text == pytest.approx((alone - text) / ulysses, rel=1e-3)
    # cfg=2: one row per rank, as in sequential CFG on one device
    assert stats.activation_bytes(*SIZE_720P, cfg_rows=1) == pytest.approx(alone / 2, rel=0.01)


def test_the_planner_plans_one_ranks_share(a14b):
    """64 GiB (text encoder on the host): one device must run CFG sequentially to keep A14B 720p
    resident, a rank of Ulysses 2 keeps CFG batched (half the tokens)."""
    stats, budget = model_stats(a14b), Budget(64 * GIB, 512 * GIB)
    alone = choose(stats, budget, SIZE_720P, "bf16", 1, "auto", "auto")
    rank = choose(stats, budget, SIZE_720P, "bf16", 1, "auto", "auto", group=(2, 1))
    assert (alone.mode, alone.cfg_mode, alone.text_encoder) == ("resident", "sequential", "cpu")
    assert (rank.mode, rank.cfg_mode, rank.text_encoder) == ("resident", "batched", "cpu")


def test_inspect_reports_groups_of_2_4_8(a14b, capsys):
    assert main([str(a14b), "--json"]) == 0
    groups = {(g["ulysses"], g["cfg"]): g for g in json.loads(capsys.readouterr().out)["groups"]}
    assert set(groups) == {(1, 1), (2, 1), (1, 2), (4, 1), (2, 2), (8, 1), (4, 2)}
    assert len({g["weights_bytes"] for g in groups.values()}) == 1
    assert groups[(8, 1)]["tokens_per_device"] == 75600 // 8
    assert groups[(8, 1)]["activation_bytes"] < groups[(4, 1)]["activation_bytes"] < groups[(1, 1)]["activation_bytes"]


def test_devices_split_into_groups():
    config = WorkersConfig(devices=tuple(f"cuda:{i}" for i in range(8)), parallel="ulysses=2,cfg=2")
    assert config.worker_groups() == [tuple(f"cuda:{i}" for i in range(4)), tuple(f"cuda:{i}" for i in range(4, 8))]
    assert WorkersConfig(count=4, parallel="auto").degrees() == (2, 2)
    assert WorkersConfig(count=3, parallel="auto").degrees() == (3, 1)
    assert WorkersConfig(count=2).worker_groups() == [("cpu",), ("cpu",)]


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (dict(parallel="ulysses=2,cfg=3"), "cfg is 1 or 2"),
        (dict(parallel="ring=2"), "write ulysses=U,cfg=C"),
        (dict(parallel="ulysses=3", count=4), "give a multiple of 3 devices or workers"),
    ],
)
def test_a_bad_parallel_names_the_fix(given, message):
    with pytest.raises(ValidationError, match=message):
        WorkersConfig(**given)


def test_the_step_cache_is_refused_in_a_group(tiny_model_dir):
    with pytest.raises(ValidationError, match="--step-cache-threshold does not combine with --parallel"):
        ServerConfig(
            model_dir=tiny_model_dir,
            workers={"count": 2, "parallel": "ulysses=2"},
            sampling={"step_cache_threshold": 0.05},
        )


def test_the_decode_lane_is_refused_in_a_group_but_auto_is_not(tiny_model_dir):
    with pytest.raises(ValidationError, match="--vae-overlap on does not combine with --parallel"):
        ServerConfig(model_dir=tiny_model_dir, workers={"count": 2, "parallel": "ulysses=2"}, vae={"overlap": "on"})
    ServerConfig(model_dir=tiny_model_dir, workers={"count": 2, "parallel": "ulysses=2"}, vae={"overlap": "auto"})
