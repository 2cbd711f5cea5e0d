"""The config tree and the CLI generated from it: every field has exactly one flag on `serve`, each
flag lands in its field, `generate` shares the model and runner flags, and no flag the README
documents went missing."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from serve.cli import ADAPTERS, GENERATE_FIELDS, _build_parser, server_config
from serve.cli_flags import Flag, flags
from serve.config import ServerConfig
from serve.lora.config import FusedLoraFile

ALL_FLAGS = list(flags(ServerConfig))
# Fields of the tree with no flag on `serve`. Empty: every field is settable from the command line.
# (A field added here needs a comment saying why the operator cannot set it.)
NOT_ON_THE_COMMAND_LINE: set[tuple[str, ...]] = set()
# The flags of `serve` and `generate` before the CLI was generated (README.md documents them).
SERVE_FLAGS_BEFORE = """
    --device --devices --dtype --expert-policy --host --lora-dir --lora-high --lora-high-scale --lora-low
    --lora-low-scale --max-batch-cost-s --max-batch-size --max-fps --max-guidance-scale --max-height
    --max-num-frames --max-num-inference-steps --max-prompt-chars --max-queue --max-width --memory-mode
    --model --output-dir --port --prefetch-blocks --preset --quant --quant-skip --ram --request-timeout-s
    --step-cache-threshold --text-encoder-device --vae-chunk-frames --vae-order --vae-tile --vae-tile-overlap
    --vae-workers --vram --weights-dtype --workers
""".split()  # noqa: SIM905 (one block of flags reads like the --help it mirrors)
GENERATE_FLAGS_BEFORE = """
    --device --dtype --fps --guidance-scale --guidance-scale-2 --height --lora-dir --lora-high
    --lora-high-scale --lora-low --lora-low-scale --lossless --memory-mode --model --negative-prompt
    --num-frames --output --prefetch-blocks --preset --prompt --quant --quant-skip --ram --sampler --seed
    --step-cache-threshold --steps --text-encoder-device --vae-chunk-frames --vae-order --vae-tile
    --vae-tile-overlap --vae-workers --vram --weights-dtype --width
""".split()  # noqa: SIM905
# Values for fields whose type alone does not give a valid non-default one.
SAMPLES = {
    ("host",): "0.0.0.0",
    ("served_model_name",): "wan2.2-t2v",
    ("limits", "max_num_frames"): "81",
    ("workers", "device"): "cuda:1",
    ("workers", "parallel"): "auto",
    ("quant", "policy"): "high=w8a8-int8,low=none",
    ("quant", "skip"): "attn1",
    ("vae", "tile_sample_size"): "256",
    ("memory", "vram"): "24GiB",
    ("memory", "ram"): "64GiB",
    ("jobs", "job_store"): "redis://127.0.0.1:6379/0",
    ("jobs", "artifacts"): "s3://videos/reelserve",
    ("jobs", "s3_endpoint_url"): "http://127.0.0.1:8333",
    ("access", "api_keys"): "a-long-random-key",
    ("jobs", "webhook_urls"): "http://127.0.0.1:9/hook",
    ("jobs", "webhook_secret"): "whsec_c2VjcmV0",
}
# Flags that are only valid with another: a shared job store needs shared files, webhooks a secret.
COMPANIONS = {
    ("jobs", "job_store"): ["--artifacts", "s3://videos/reelserve"],
    ("jobs", "webhook_urls"): ["--webhook-secret", "whsec_c2VjcmV0"],
}


def subcommand(name: str) -> argparse.ArgumentParser:
    (sub,) = [a for a in _build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices[name]


def options(name: str) -> dict[str, argparse.Action]:
    return {o: a for a in subcommand(name)._actions for o in a.option_strings}


def at(config, path: tuple[str, ...]):
    for name in path:
        config = getattr(config, name)
    return config


def sample(flag: Flag, action: argparse.Action, tmp_path: Path) -> tuple[str, object]:
    """A valid value other than the default for `flag`, as text and as the field should hold it."""
    default = at(ServerConfig.model_construct(), flag.path)
    kind = action.type
    if flag.path in SAMPLES:
        text = SAMPLES[flag.path]
    elif action.choices:
        text = next(c for c in action.choices if c != default)
    elif kind is int:
        text = str((default or 1) + 1)
    elif kind is float:
        text = str((default or 0) + 0.5)
    elif kind is Path:
        text = str(tmp_path / flag.dest)
        (tmp_path / flag.dest).write_text("a-key-from-a-file\n")  # files named by flags are read at start
    else:
        raise AssertionError(f"{flag.name}: add a sample value to SAMPLES")
    value = kind(text) if kind else text
    return text, ((value,) if isinstance(action, argparse._AppendAction) else value)


def test_every_field_has_one_flag_on_serve():
    names = [f.name for f in ALL_FLAGS]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    on_serve = options("serve")
    wanted = [name for f in ALL_FLAGS if f.path not in NOT_ON_THE_COMMAND_LINE for name in flag_names(f)]
    assert [name for name in wanted if name not in on_serve] == []


def flag_names(f: Flag) -> list[str]:
    """The flag of a field, or the flags of its adapter (`--lora-high/--lora-low`)."""
    adapter = ADAPTERS.get(f.path)
    return (adapter.label or f.name).split("/") if adapter else [f.name]


def test_no_documented_flag_went_missing():
    assert sorted(set(SERVE_FLAGS_BEFORE) - set(options("serve"))) == []
    assert sorted(set(GENERATE_FLAGS_BEFORE) - set(options("generate"))) == []


def test_no_flag_given_is_the_models_defaults(tiny_model_dir):
    args = _build_parser().parse_args(["serve", "--model", str(tiny_model_dir)])
    assert server_config(args) == ServerConfig(model_dir=tiny_model_dir)


@pytest.mark.parametrize("command", ["serve", "generate"])
@pytest.mark.parametrize("flag", [f for f in ALL_FLAGS if f.path not in ADAPTERS], ids=lambda f: f.name)
def test_each_flag_lands_in_its_field(command, flag, tiny_model_dir, tmp_path):
    if command == "generate" and not any(flag.path[: len(p)] == p for p in GENERATE_FIELDS):
        assert flag.name not in options("generate")  # serve-only: the server, worker pool, scheduler, limits
        return
    argv = [command] + (["--prompt", "x"] if command == "generate" else [])
    if flag.path == ("model_dir",):
        config = server_config(_build_parser().parse_args([*argv, flag.name, str(tiny_model_dir)]))
        assert config.model_dir == tiny_model_dir.resolve()
        return
    action = options(command)[flag.name]
    if isinstance(action, argparse.BooleanOptionalAction):  # `--x` turns on what is off by default
        given, expected = [flag.name], True
    else:
        text, expected = sample(flag, action, tmp_path)
        given = [flag.name, text]
    given += COMPANIONS.get(flag.path, [])
    config = server_config(_build_parser().parse_args([*argv, "--model", str(tiny_model_dir), *given]))
    assert at(config, flag.path) == expected != at(ServerConfig(model_dir=tiny_model_dir), flag.path)


def test_devices_and_fused_loras_have_their_own_shapes(tiny_model_dir, tmp_path):
    argv = ["serve", "--model", str(tiny_model_dir), "--devices", "cuda:0, cuda:1", "--workers", "3"]
    argv += ["--lora-high", str(tmp_path / "a.safetensors"), "--lora-low", "b.safetensors", "--lora-low-scale", "0.5"]
    config = server_config(_build_parser().parse_args(argv))
    assert config.workers.devices == ("cuda:0", "cuda:1") and config.workers.worker_devices() == ["cuda:0", "cuda:1"]
    assert config.lora.fused == (
        FusedLoraFile(path=tmp_path / "a.safetensors", expert=0, scale=1.0),
        FusedLoraFile(path=Path("b.safetensors"), expert=1, scale=0.5),
    )
    plain = server_config(_build_parser().parse_args(["serve", "--model", str(tiny_model_dir), "--workers", "3"]))
    assert plain.workers.worker_devices() == ["cpu"] * 3 and plain.lora.fused == ()


def test_dtype_follows_the_device_unless_given(tiny_model_dir):
    def dtype(*flags: str) -> str:
        return server_config(
            _build_parser().parse_args(["serve", "--model", str(tiny_model_dir), *flags])
        ).workers.dtype

    assert (dtype(), dtype("--device", "cuda:0"), dtype("--device", "cuda:0", "--dtype", "float16")) == (
        "float32",
        "bfloat16",
        "float16",
    )


def test_the_worker_gets_the_sub_configs_as_they_are(tiny_model_dir):
    from serve.engine.client import runner_config

    config = ServerConfig(model_dir=tiny_model_dir, limits={"max_height": 720, "max_num_frames": 81})
    runner = runner_config(config)
    assert (runner.quant, runner.lora, runner.sampling, runner.vae, runner.memory) == (
        config.quant,
        config.lora,
        config.sampling,
        config.vae,
        config.memory,
    )
    assert runner.vae is config.vae and runner.largest_request == (720, 1280, 81)


def test_every_config_module_imports_no_torch():
    modules = "serve.config, serve.cli, serve.cli_flags, serve.worker.factory, serve.loader.config, serve.vae.config"
    code = f"import sys, {modules}; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_quantize_takes_the_quant_flags_with_the_policy_named_scheme():
    from serve.cli import QUANTIZE_ADAPTERS
    from serve.cli_flags import given_values
    from serve.quant.config import QuantizationConfig

    args = _build_parser().parse_args(["quantize", "in", "out", "--scheme", "w8a8-int8", "--quant-skip", "attn1"])
    quant = QuantizationConfig.model_validate(given_values(args, args.quant_flags, QUANTIZE_ADAPTERS))
    assert quant == QuantizationConfig(policy="w8a8-int8", skip=("attn1",))
