"""Damaged or hostile checkpoints are refused from their headers and configs, before the loader
reads what a length field asks for or builds what a config asks for, with a message naming the
file and the field."""

import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from models.inspect import REFERENCE_MODELS, write_header_fixture
from models.tiny import LAYOUTS, write_tiny_checkpoint
from serve.cli import main
from serve.loader import CheckpointError, load_component, read_header
from serve.loader.build import ALLOWED
from serve.loader.config_check import open_components
from serve.loader.index import MAX_HEADER_BYTES
from serve.loader.wan_configs import RULES

INDEX = "diffusion_pytorch_model.safetensors.index.json"
SINGLE_FILE = "diffusion_pytorch_model.safetensors"
GIB = 2**30


@pytest.fixture
def model_dir(tiny_model_dir, tmp_path) -> Path:
    """A private copy of the tiny two-expert checkpoint (under 1 MB) to damage."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def edit_config(folder: Path, **fields) -> Path:
    path = folder / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | fields))
    return path


def set_header_length(path: Path, length: int, file_size: int) -> None:
    """Overwrite the 8-byte header length and grow the file, sparsely, to `file_size` bytes, so the
    length is within the file and only the format's limit can refuse it."""
    with path.open("r+b") as f:
        f.write(struct.pack("<Q", length))
        f.truncate(file_size)


def stop_builds(monkeypatch, names: tuple[str, ...]) -> list[str]:
    """Make the named builders raise, and record each call: the list stays empty when a checkpoint
    is refused from its config and headers alone."""
    import serve.loader.config_check as config_check
    import serve.loader.load as load

    calls: list[str] = []
    owners = {"build_empty": load, "_build_on_meta": config_check}

    def refuse(name):
        def build(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} was called for a checkpoint that should be refused first")

        return build

    for name in names:
        monkeypatch.setattr(owners[name], name, refuse(name))
    return calls


@pytest.fixture
def no_builds(monkeypatch) -> list[str]:
    """No module is built, not even on the meta device."""
    return stop_builds(monkeypatch, ("build_empty", "_build_on_meta"))


@pytest.fixture
def no_loading_builds(monkeypatch) -> list[str]:
    """No module is built for loading (the meta build of the check itself may run)."""
    return stop_builds(monkeypatch, ("build_empty",))


# ---- header lengths ------------------------------------------------------------------------------

PEAK_PROBE = r"""
import json, sys
import torch, diffusers, transformers, safetensors  # noqa: F401  (imported before the baseline)
from serve.loader import CheckpointError, load_component
import serve.loader.load, serve.loader.config_check  # noqa: F401

def high_water_mark():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM: from here on it covers the load only
baseline = high_water_mark()
try:
    load_component(sys.argv[1])
    message = None
except CheckpointError as e:
    message = str(e)
print(json.dumps({"grew": high_water_mark() - baseline, "message": message}))
"""


def test_a_1_gib_header_length_is_refused_without_reading_it(tiny_model_dir, tmp_path):
    vae = Path(shutil.copytree(tiny_model_dir / "vae", tmp_path / "vae"))
    set_header_length(vae / SINGLE_FILE, GIB, GIB + 4096)
    # A fresh interpreter: the peak then measures this load alone, not the test session's history.
    out = subprocess.run(
        [sys.executable, "-c", PEAK_PROBE, str(vae)], capture_output=True, text=True, timeout=300, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    message = result["message"]
    assert message is not None, "a 1 GiB header length was accepted"
    assert str(vae / SINGLE_FILE) in message and f"{GIB:,}" in message and f"{MAX_HEADER_BYTES:,}" in message
    assert result["grew"] < 100 * 2**20, f"peak RSS grew {result['grew'] / 2**20:.0f} MiB refusing the header"


def test_a_sparse_100_gib_file_with_a_huge_header_length_names_the_file(model_dir):
    shard = sorted((model_dir / "transformer").glob("diffusion_pytorch_model-*.safetensors"))[0]
    set_header_length(shard, 100 * GIB - 8, 100 * GIB)
    with pytest.raises(CheckpointError) as info:
        read_header(shard)
    assert str(shard) in str(info.value) and f"{100 * GIB - 8:,}" in str(info.value)
    with pytest.raises(CheckpointError, match="over the safetensors limit") as info:
        load_component(model_dir / "transformer")
    assert str(shard) in str(info.value)


def test_a_config_json_over_the_limit_is_refused_unread(model_dir):
    config = model_dir / "vae" / "config.json"
    with config.open("r+b") as f:
        f.truncate(MAX_HEADER_BYTES + 1)  # sparse: a stat says 100 MB, nothing is on disk
    with pytest.raises(CheckpointError) as info:
        load_component(model_dir / "vae")
    assert str(config) in str(info.value) and "limit" in str(info.value)


# ---- configs against the headers ------------------------------------------------------------------


def test_num_layers_100000_is_refused_before_anything_is_built(model_dir, no_builds):
    config = edit_config(model_dir / "transformer", num_layers=100000)
    start = time.monotonic()
    with pytest.raises(CheckpointError) as info:
        load_component(model_dir / "transformer")
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert str(config) in message and "num_layers is 100000" in message and "hold 2 (blocks.0 to blocks.1)" in message
    assert no_builds == []
    assert elapsed < 5, f"refusing took {elapsed:.1f} s"  # a guard: the check itself takes milliseconds


@pytest.mark.parametrize(
    ("component", "fields", "named"),
    [
        ("transformer", {"ffn_dim": 4096}, ["ffn_dim is 4096", "'blocks.0.ffn.net.0.proj.weight'", "[32, 24]"]),
        ("transformer", {"in_channels": 36}, ["in_channels is 36", "'patch_embedding.weight'"]),
        ("transformer", {"num_attention_heads": 400}, ["num_attention_heads x attention_head_dim is 400 x 12"]),
        ("transformer", {"image_dim": 1280}, ["image_dim is 1280", "image_embedder"]),
        ("vae", {"z_dim": 48}, ["z_dim is 48", "'encoder.conv_out.weight'", "[32, 8, 3, 3, 3]"]),
        ("vae", {"num_res_blocks": 50}, ["num_res_blocks is 50", "decoder.up_blocks.0.resnets.1"]),
        ("text_encoder", {"d_model": 4096}, ["d_model is 4096", "'shared.weight'"]),
        ("text_encoder", {"vocab_size": 10**9}, ["vocab_size is 1000000000", "'shared.weight'"]),
    ],
)
def test_config_fields_that_disagree_with_the_header_shapes_are_named(model_dir, no_builds, component, fields, named):
    config = edit_config(model_dir / component, **fields)
    with pytest.raises(CheckpointError) as info:
        load_component(model_dir / component)
    assert str(config) in str(info.value) and all(n in str(info.value) for n in named), str(info.value)
    assert no_builds == []


@pytest.mark.parametrize(("field", "value"), [("num_layers", True), ("num_layers", "40"), ("patch_size", [1, 2])])
def test_config_fields_of_the_wrong_type_are_named(model_dir, field, value):
    config = edit_config(model_dir / "transformer", **{field: value})
    with pytest.raises(CheckpointError, match=re.escape(f"{field} is {value!r}, but it must be")) as info:
        load_component(model_dir / "transformer")
    assert str(config) in str(info.value)


def test_a_dim_no_key_tensor_shows_is_caught_on_the_meta_module(model_dir, no_loading_builds):
    """A middle dim_mult entry sizes only inner VAE stages: the meta build's shapes catch it before
    `build_empty` would allocate a 1000x wider stage."""
    mult = json.loads((model_dir / "vae" / "config.json").read_text())["dim_mult"]
    edit_config(model_dir / "vae", dim_mult=[mult[0], 1000, *mult[2:]])
    with pytest.raises(CheckpointError, match=r"'encoder\.down_blocks\.\d+\..*' in .* has shape") as info:
        load_component(model_dir / "vae")
    assert str(model_dir / "vae" / SINGLE_FILE) in str(info.value) and no_loading_builds == []


def test_a_tensor_the_headers_lack_cannot_be_sized_by_the_config(model_dir, no_loading_builds):
    """Without `shared.weight` no header shows vocab_size; a config asking for a billion rows is
    still refused, as larger than anything the checkpoint holds, not allocated."""
    path = model_dir / "text_encoder" / "model.safetensors"
    tensors = load_file(path)
    del tensors["shared.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    config = edit_config(model_dir / "text_encoder", vocab_size=10**9)
    with pytest.raises(CheckpointError, match=r"'shared\.weight' of shape \[1000000000, 32\]") as info:
        load_component(model_dir / "text_encoder")
    assert str(config) in str(info.value) and no_loading_builds == []


@pytest.mark.parametrize("total", [113_312 * 1000, 10, "57GB"])
def test_an_index_whose_total_size_disagrees_is_refused(model_dir, no_builds, total):
    index_path = model_dir / "transformer" / INDEX
    index = json.loads(index_path.read_text())
    index["metadata"]["total_size"] = total
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="metadata.total_size") as info:
        load_component(model_dir / "transformer")
    assert str(index_path) in str(info.value) and no_builds == []


# ---- through the real entry points -----------------------------------------------------------------


def test_the_worker_refuses_a_bad_second_expert_before_building_the_first_component(model_dir, no_builds):
    from serve.worker.factory import load_model_runner

    config = edit_config(model_dir / "transformer_2", num_layers=100000)
    with pytest.raises(CheckpointError) as info:
        load_model_runner(str(model_dir), "cpu", "float32")
    assert str(config) in str(info.value) and "num_layers is 100000" in str(info.value)
    assert no_builds == []  # not even the text encoder, which loads first


def test_inspect_prints_one_line_naming_the_file_and_field(model_dir, capsys):
    config = edit_config(model_dir / "transformer_2", num_layers=100000)
    assert main(["inspect", str(model_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("reelserve inspect: error: ") and f"{config}: num_layers is 100000" in err


def test_serve_exits_2_with_one_line_naming_the_file_and_field(model_dir, tmp_path):
    config = edit_config(model_dir / "transformer", num_layers=100000)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = ["serve", "--model", str(model_dir), "--port", str(port), "--output-dir", str(tmp_path / "out")]
    run = subprocess.run(
        [sys.executable, "-m", "serve.cli", *argv], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    last = run.stderr.strip().splitlines()[-1]
    assert run.returncode == 2, run.stderr[-2000:]
    # The CLI's own message: one line, naming the file and the field (the worker's log above it
    # keeps its traceback for the operator who wants it).
    assert last.startswith("reelserve serve: error: ") and f"{config}: num_layers is 100000" in last


# ---- every layout the project reads still passes ----------------------------------------------------


def test_every_allowed_class_has_rules():
    assert set(RULES) == set(ALLOWED)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_tiny_layout_passes(tmp_path, layout):
    opened = open_components(components(write_tiny_checkpoint(tmp_path / layout, layout=layout)))
    assert [c.name for c, _, _ in opened] == ["UMT5EncoderModel", "AutoencoderKLWan"] + ["WanTransformer3DModel"] * (
        len(opened) - 2
    )


@pytest.fixture(scope="module")
def reference_dirs(tmp_path_factory) -> dict[str, Path]:
    """Header-only copies of Wan2.2 T2V-A14B and TI2V-5B: real configs, real shapes, sparse data."""
    root = tmp_path_factory.mktemp("reference")
    return {model: write_header_fixture(root / model, model) for model in REFERENCE_MODELS}


def components(root: Path) -> list[Path]:
    return [root / name for name in ("text_encoder", "vae", "transformer", "transformer_2") if (root / name).is_dir()]


@pytest.mark.parametrize("model", REFERENCE_MODELS)
def test_the_real_wan22_configs_pass_against_their_header_shapes(reference_dirs, model):
    opened = open_components(components(reference_dirs[model]))
    assert len(opened) == 2 + REFERENCE_MODELS[model][1]


def test_a_real_sized_num_layers_mismatch_is_refused_in_well_under_a_second(reference_dirs, tmp_path):
    # Weights linked, not copied: a copy of the sparse files would write their 130 GB of zeros.
    root = Path(shutil.copytree(reference_dirs["Wan2.2-T2V-A14B"], tmp_path / "a14b", copy_function=os.symlink))
    for config in root.glob("*/config.json"):
        config.unlink()
        shutil.copy(reference_dirs["Wan2.2-T2V-A14B"] / config.relative_to(root), config)
    edit_config(root / "transformer_2", num_layers=100000)
    start = time.monotonic()
    with pytest.raises(CheckpointError, match="num_layers is 100000, but the weights in .* hold 40"):
        open_components(components(root))
    assert time.monotonic() - start < 5  # a guard; the check reads four headers and a few configs


def test_a_checkpoint_holding_a_fraction_of_what_its_config_builds_is_refused(reference_dirs):
    """The last net: tensors the headers lack, each no larger than one they hold, but together far
    more than the checkpoint declares (here, an A14B config over a checkpoint of one tensor)."""
    from serve.loader.build import read_component_config
    from serve.loader.config_check import check_built
    from serve.loader.index import CheckpointIndex

    folder = reference_dirs["Wan2.2-T2V-A14B"] / "transformer"
    header = read_header(folder / SINGLE_FILE)
    kept = "condition_embedder.time_proj.weight"  # the largest tensor: no missing one exceeds it
    index = CheckpointIndex(folder, folder / SINGLE_FILE, {kept: header[kept]})
    component, config = read_component_config(folder)
    with pytest.raises(CheckpointError, match=r"has 14,288,491,584 parameters, at least 57\.15 GB as F32") as info:
        check_built(component, config, folder / "config.json", index)
    assert str(folder / "config.json") in str(info.value) and "holds 0.63 GB" in str(info.value)
