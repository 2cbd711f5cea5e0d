"""`reelserve serve --config FILE` and `REELSERVE_*` variables: every option of `serve` can be given
in all three places, command line > environment > file > defaults, and a bad file key or value is
one line naming the file (or variable), the key and the fix or limit."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from serve.cli import ADAPTERS, _build_parser, main, server_config
from serve.config import ServerConfig
from tests.test_config_tree import ALL_FLAGS, COMPANIONS, at, options, sample


def config_of(tiny_model_dir: Path, *argv: str, env: dict[str, str] | None = None, file: dict | None = None, tmp=None):
    """The ServerConfig of `serve --model TINY argv` with `env` as the whole environment and
    `file` (written as YAML under `tmp`) as `--config`."""
    if file is not None:
        path = tmp / "serve.yaml"
        path.write_text(yaml.safe_dump(file))
        argv = ("--config", str(path), *argv)
    args = _build_parser().parse_args(["serve", "--model", str(tiny_model_dir), *argv])
    return server_config(args, environ=env or {})


def env_name(flag: str) -> str:
    return "REELSERVE_" + flag.removeprefix("--").upper().replace("-", "_")


def companions_as(flag_path, key_of) -> dict[str, str]:
    given = COMPANIONS.get(flag_path, [])
    return {key_of(given[i]): given[i + 1] for i in range(0, len(given), 2)}


@pytest.mark.parametrize("flag", [f for f in ALL_FLAGS if f.path not in ADAPTERS], ids=lambda f: f.name)
def test_every_flag_reads_the_same_from_the_file_and_the_environment(flag, tiny_model_dir, tmp_path):
    action = options("serve")[flag.name]
    if isinstance(action, argparse.BooleanOptionalAction):
        argv, file_value, env_value, expected = [flag.name], True, "true", True
    else:
        text, expected = sample(flag, action, tmp_path)
        argv, file_value, env_value = [flag.name, text], text, text
    argv += COMPANIONS.get(flag.path, [])
    key = flag.name.removeprefix("--")
    variable = flag.env or env_name(flag.name)
    by_flag = config_of(tiny_model_dir, *argv)
    by_file = config_of(
        tiny_model_dir, file={key: file_value, **companions_as(flag.path, lambda f: f[2:])}, tmp=tmp_path
    )
    by_env = config_of(tiny_model_dir, env={variable: env_value, **companions_as(flag.path, env_name)})
    assert at(by_flag, flag.path) == expected != at(ServerConfig(model_dir=tiny_model_dir), flag.path)
    assert by_file == by_flag
    assert by_env == by_flag


def test_the_adapters_flags_read_from_the_file_and_the_environment(tiny_model_dir, tmp_path):
    """`--model`, `--devices` (resolved after merging: `auto` here means the one CPU) and the fused
    LoRA flags, whose values are not one field each."""
    lora = tmp_path / "high.safetensors"
    file = {"model": str(tiny_model_dir), "devices": "auto", "lora-high": str(lora), "lora-high-scale": 0.5}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(file))
    by_file = server_config(_build_parser().parse_args(["serve", "--config", str(path)]), environ={})
    env = {"REELSERVE_MODEL": str(tiny_model_dir), "REELSERVE_DEVICES": "auto"}
    env |= {"REELSERVE_LORA_HIGH": str(lora), "REELSERVE_LORA_HIGH_SCALE": "0.5"}
    by_env = server_config(_build_parser().parse_args(["serve"]), environ=env)
    assert by_file == by_env
    assert by_file.model_dir == tiny_model_dir.resolve() and by_file.workers.devices == ("cpu",)
    assert [(f.path, f.expert, f.scale) for f in by_file.lora.fused] == [(lora, 0, 0.5)]


def test_command_line_beats_environment_beats_file_beats_defaults(tiny_model_dir, tmp_path):
    file = {"port": 9001, "max_queue": 3, "max-batch-size": 5, "presigned-urls": True, "api-key": ["file-key-0123"]}
    env = {"REELSERVE_PORT": "9002", "REELSERVE_MAX_QUEUE": "4", "REELSERVE_API_KEYS": "env-key-0123,env-key-4567"}
    config = config_of(tiny_model_dir, "--port", "9003", env=env, file=file, tmp=tmp_path)
    assert config.port == 9003  # all three: the command line
    assert config.scheduler.max_queue == 4  # environment and file: the environment
    assert config.access.api_keys == ("env-key-0123", "env-key-4567")  # a repeatable one is replaced, not merged
    assert config.scheduler.max_batch_size == 5 and config.jobs.presigned_urls is True  # the file only
    assert config.host == ServerConfig.model_fields["host"].default  # nowhere: the default
    # A switch given on the command line beats the file's, either way round.
    assert config_of(tiny_model_dir, "--no-presigned-urls", file=file, tmp=tmp_path).jobs.presigned_urls is False


def test_the_names_deployments_already_use(tiny_model_dir, tmp_path):
    """deploy/ and the README pass the stores and secrets as these variables; they keep working."""
    env = {
        "REELSERVE_JOB_STORE": "redis://redis:6379/0",
        "REELSERVE_ARTIFACTS": "s3://videos/reelserve",
        "REELSERVE_S3_ENDPOINT_URL": "http://s3:8333",
        "REELSERVE_WEBHOOK_URL": "http://hooks.example/a, http://hooks.example/b",
        "REELSERVE_WEBHOOK_SECRET": "whsec_c2VjcmV0",
        "REELSERVE_API_KEYS": '["key-one-0123", "key-two-0123"]',  # a JSON list reads too
    }
    config = config_of(tiny_model_dir, env=env)
    assert (config.jobs.job_store, config.jobs.artifacts) == ("redis://redis:6379/0", "s3://videos/reelserve")
    assert config.jobs.s3_endpoint_url == "http://s3:8333" and config.jobs.webhook_secret == "whsec_c2VjcmV0"
    assert config.jobs.webhook_urls == ("http://hooks.example/a", "http://hooks.example/b")
    assert config.access.api_keys == ("key-one-0123", "key-two-0123")
    assert config_of(tiny_model_dir, env={"REELSERVE_JOB_STORE": ""}).jobs.job_store == "sqlite"  # empty is unset


def test_the_file_can_come_from_the_environment(tiny_model_dir, tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("# reelserve settings\nmax-queue: 7\nlog-format: json\n")
    config = config_of(tiny_model_dir, env={"REELSERVE_CONFIG": str(path)})
    assert config.scheduler.max_queue == 7 and config.log_format == "json"


def run_serve(tmp_path, capsys, text: str | None, *argv: str, env: dict[str, str] | None = None) -> str:
    """`reelserve serve` with `text` as its config file: the exit code must be 2 and stderr one line."""
    if text is not None:
        (tmp_path / "serve.yaml").write_text(text)
        argv = ("--config", str(tmp_path / "serve.yaml"), *argv)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in (env or {}).items():
            patch.setenv(name, value)
        assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max-qeue: 4\n", "serve.yaml: unknown key 'max-qeue'; did you mean 'max-queue'?"),
        ("colour: blue\n", "serve.yaml: unknown key 'colour'; the keys are `reelserve serve --help`'s flags"),
        ("port: 70000\n", "serve.yaml: port: Input should be less than or equal to 65535"),
        ("max_queue: 0\n", "serve.yaml: max_queue: Input should be greater than or equal to 1"),
        ("port: eighty\n", "serve.yaml: port: 'eighty' is not an integer"),
        ("port: yes\n", "serve.yaml: port: True is not an integer; quote it if it is a name"),
        ("log-format: xml\n", "serve.yaml: log-format: 'xml' is not one of text, json"),
        ("presigned-urls: maybe\n", "serve.yaml: presigned-urls: 'maybe' is not a switch; use true or false"),
        ("max-num-frames: 10\n", "serve.yaml: max-num-frames: max_num_frames=10 is not of the form 4k+1; use 9"),
        ("scheduler:\n  max-queue: 4\n", "serve.yaml: scheduler: the file is flat, one key per flag"),
        ("port: [1, 2]\n", "serve.yaml: port: [1, 2] is not a single value; give an integer"),
        ("- port\n", "serve.yaml: the file must be a mapping of flag names to values"),
        ("port: 1\n  host: x\n", "serve.yaml: not valid YAML at line 2"),
        ("port: 1\nport_: 2\n", "serve.yaml: unknown key 'port_'"),
    ],
)
def test_a_bad_file_is_one_line_naming_the_file_the_key_and_the_fix(tmp_path, capsys, tiny_model_dir, text, message):
    assert message in run_serve(tmp_path, capsys, text, "--model", str(tiny_model_dir))


def test_a_bad_variable_is_one_line_naming_the_variable_and_the_limit(tmp_path, capsys, tiny_model_dir):
    model = ("--model", str(tiny_model_dir))
    err = run_serve(tmp_path, capsys, None, *model, env={"REELSERVE_PORT": "70000"})
    assert "REELSERVE_PORT: Input should be less than or equal to 65535" in err
    err = run_serve(tmp_path, capsys, None, *model, env={"REELSERVE_MEMORY_MODE": "everything"})
    assert "REELSERVE_MEMORY_MODE: 'everything' is not one of auto, resident, expert-swap, block-offload" in err
    err = run_serve(tmp_path, capsys, None, *model, env={"REELSERVE_API_KEYS": "[1, "})
    assert "REELSERVE_API_KEYS: not a JSON list" in err
    # A missing file names the flag to fix; a missing model names where it came from.
    assert "cannot read the config file" in run_serve(tmp_path, capsys, None, *model, "--config", "/nonexistent.yaml")
    assert "serve.yaml: model:" in run_serve(tmp_path, capsys, "model: /nonexistent\n")


def test_a_misspelt_variable_is_warned_about(tiny_model_dir, capsys):
    config = config_of(tiny_model_dir, env={"REELSERVE_MAX_QEUE": "4", "REELSERVE_FAKE_LOAD_DELAY_S": "1"})
    assert config.scheduler.max_queue == ServerConfig.model_fields["scheduler"].default.max_queue
    err = capsys.readouterr().err
    assert "REELSERVE_MAX_QEUE is not a setting and is ignored; did you mean REELSERVE_MAX_QUEUE?" in err
    assert "FAKE_LOAD" not in err  # far from every setting: another tool's variable, not a typo


def test_the_images_defaults_are_a_file_that_variables_and_flags_override(tiny_model_dir):
    """The Docker image's host/port/model/device come from deploy/serve.yaml (REELSERVE_CONFIG), not
    from flags baked into its ENTRYPOINT/CMD, which would beat `docker run -e REELSERVE_...`."""
    root = Path(__file__).resolve().parents[1]
    dockerfile = (root / "Dockerfile").read_text()
    assert "COPY deploy/serve.yaml /etc/reelserve/serve.yaml" in dockerfile
    assert "ENV REELSERVE_CONFIG=/etc/reelserve/serve.yaml" in dockerfile
    assert 'ENTRYPOINT ["reelserve", "serve"]' in dockerfile and "\nCMD " not in dockerfile
    env = {"REELSERVE_CONFIG": str(root / "deploy/serve.yaml"), "REELSERVE_DEVICE": "cpu:0"}
    # --model on the command line (the image's /models path does not exist here), the device from the
    # environment, host and port from the image's file.
    config = config_of(tiny_model_dir, env=env)
    assert (config.host, config.port, config.workers.device) == ("0.0.0.0", 8000, "cpu:0")
    assert config.model_dir == tiny_model_dir
