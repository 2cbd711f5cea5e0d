"""bench/gpu_check.py's logic on the CPU: every section runs with the CPU as the device against the
session's tiny checkpoint and passes its own assertions; a failing section is reported, not fatal."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_cpu_dry_run_passes_every_section(tiny_model_dir, tmp_path):
    out = tmp_path / "results.json"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu", "--model", str(tiny_model_dir), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    print(run.stdout)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results) == set(load_script().SECTIONS)
    assert results.pop("worker_group")["status"] == "SKIP"  # needs 2 GPUs
    assert {name: r["status"] for name, r in results.items()} == dict.fromkeys(results, "PASS")
    residency = results["residency"]["figures"]
    assert residency["expert-swap swaps"] >= 1 and residency["block-offload ledger MiB"] > 0
    assert results["load"]["figures"]["staged GB/s (warm)"] > 0


def test_a_failing_section_is_reported_and_the_rest_still_run(capsys):
    gpu_check = load_script()

    def broken(ctx):
        gpu_check.check(False, "the kernel returned garbage")

    gpu_check.SECTIONS = {"broken": broken, "fine": lambda ctx: {"figure": 1.0}}
    ctx = gpu_check.Context(Path("."), torch.device("cpu"), torch.float32, 64, 64, 9)
    results = gpu_check.run_sections(ctx, ["broken", "fine"])
    assert results["broken"]["status"] == "FAIL" and "garbage" in results["broken"]["error"]
    assert results["fine"] == {"status": "PASS", "figures": {"figure": 1.0}, "seconds": results["fine"]["seconds"]}
    assert "[FAIL] broken" in capsys.readouterr().out
