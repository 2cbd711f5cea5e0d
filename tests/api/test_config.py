"""ServerConfig / Limits validation: bad values are refused with a message that names the fix."""

import pytest
from pydantic import ValidationError

from serve.config import Limits, ServerConfig
from serve.engine.config import WorkersConfig


def test_max_num_frames_must_be_4k_plus_1():
    with pytest.raises(ValidationError, match="max_num_frames=128 is not of the form 4k\\+1; use 125"):
        Limits(max_num_frames=128)
    assert Limits(max_num_frames=81).max_num_frames == 81


def test_min_above_max_is_refused():
    with pytest.raises(ValidationError, match="min_height=64 is above max_height=32"):
        Limits(min_height=64, max_height=32)


def test_missing_model_dir_names_the_path_and_the_flag(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ValidationError, match=f"model directory {missing} does not exist; pass --model"):
        ServerConfig(model_dir=missing)


def test_dir_without_model_index_names_the_fix(tmp_path):
    with pytest.raises(ValidationError, match="has no model_index.json; pass the diffusers-layout checkpoint root"):
        ServerConfig(model_dir=tmp_path)


def test_dtype_device_and_unknown_keys_are_checked(tiny_model_dir):
    with pytest.raises(ValidationError, match="dtype"):
        ServerConfig(model_dir=tiny_model_dir, workers=WorkersConfig(dtype="float8"))
    with pytest.raises(ValidationError, match="is not a torch device"):
        ServerConfig(model_dir=tiny_model_dir, workers={"device": "gpu0"})
    with pytest.raises(ValidationError, match="max_queue_size"):
        ServerConfig(model_dir=tiny_model_dir, max_queue_size=3)


def test_config_is_frozen(tiny_model_dir):
    config = ServerConfig(model_dir=tiny_model_dir)
    assert config.port == 8000 and config.limits.max_width == 1280
    with pytest.raises(ValidationError):
        config.port = 9000
