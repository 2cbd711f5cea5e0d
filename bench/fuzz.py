"""Schemathesis against the live OpenAPI document, every check on (`--checks all`): print how many
cases ran and each check's passes and failures, and exit non-zero on any failure.

    python bench/fuzz.py [--max-examples 100] [--seed N]

The server is the production app and worker process with the fake runner (tests/engine/
fake_runner.py: real scheduler, pipe and MP4 encoding, no model), on the tiny checkpoint, with small
size limits so each generated video takes milliseconds. tests/api/test_schema_fuzz.py runs the same
thing with a few examples per operation in CI; this is the longer run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the fake runner lives in tests/
    sys.path.insert(0, str(ROOT))

from models.tiny import write_tiny_checkpoint  # noqa: E402
from serve.config import Limits  # noqa: E402

# Small enough that a schema-valid request (anything within these) renders in milliseconds.
FUZZ_LIMITS = Limits(max_height=64, max_width=64, max_num_frames=9, max_num_inference_steps=4, max_prompt_chars=200)
SCHEMATHESIS = [sys.executable, "-m", "schemathesis.cli"]


@dataclass
class FuzzResult:
    returncode: int
    output: str
    cases: int
    """Test cases generated and sent, over every phase (coverage, fuzzing, stateful)."""
    checks: Counter
    """(check name, status) -> how many cases it judged."""
    failures: list[dict]
    """The JSON report's failures: code, title, count, operations."""

    def table(self) -> str:
        names = sorted({name for name, _ in self.checks})
        lines = [f"{'check':34} {'passed':>8} {'failed':>8}"]
        for name in names:
            lines.append(f"{name:34} {self.checks[name, 'success']:>8} {self.checks[name, 'failure']:>8}")
        return "\n".join([f"{self.cases} cases", *lines])


@contextmanager
def fuzz_server(work_dir: Path) -> Iterator[str]:
    """The production app with the fake runner, on a fresh tiny checkpoint; yields its base URL."""
    from tests.api.conftest import fake_server

    model_dir = write_tiny_checkpoint(work_dir / "wan22-tiny", size="tiny", seed=0)
    with fake_server(model_dir, limits=FUZZ_LIMITS) as server:
        yield server.url


def fuzz(url: str, max_examples: int, seed: int, report_dir: Path, timeout_s: float | None = None) -> FuzzResult:
    """One `schemathesis run` of every phase and check against `url`'s /openapi.json."""
    command = [
        *SCHEMATHESIS,
        "run",
        f"{url}/openapi.json",
        "--checks=all",
        f"--max-examples={max_examples}",
        f"--seed={seed}",
        "--workers=1",  # the machine has 2 cores and the server needs them
        "--suppress-health-check=too_slow",  # generation speed depends on the machine's load, not the API
        "--request-timeout=60",
        "--no-color",
        "--report=json,ndjson",
        f"--report-dir={report_dir}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=report_dir)
    summary = json.loads(next(report_dir.glob("json-*.json")).read_text())
    return FuzzResult(
        returncode=done.returncode,
        output=done.stdout + done.stderr,
        cases=summary["test_cases"]["generated"],
        checks=check_counts(next(report_dir.glob("ndjson-*.ndjson"))),
        failures=summary["failures"],
    )


def check_counts(events: Path) -> Counter:
    counts: Counter = Counter()
    with events.open() as lines:
        for line in lines:
            finished = json.loads(line).get("ScenarioFinished")
            for results in ((finished or {}).get("recorder") or {}).get("checks", {}).values():
                counts.update((check["name"], check["status"]) for check in results)
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-examples", type=int, default=100, help="cases per operation and phase")
    parser.add_argument("--seed", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, fuzz_server(Path(tmp)) as url:
        reports = Path(tmp) / "reports"
        reports.mkdir()
        result = fuzz(url, args.max_examples, args.seed, reports)
    print(result.table())
    if result.returncode:
        print(result.output[-20000:])
    return result.returncode


if __name__ == "__main__":  # the engine's worker is a spawned process: it re-imports this module
    sys.exit(main())
