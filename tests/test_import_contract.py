"""The import arrows between packages (README, "How it is built"), read from the source's AST.

Every import counts, including those inside functions: a lazy import is still a dependency.

- The API process (serve.api, serve.engine, serve.config) never imports torch: checked by importing it.
- serve/ knows a model family only through its torch-free parts: `models.registry` and
  `models.<family>.spec`. The worker builds a variant's stages from the path the registry gives.
  The CLI's own commands `inspect` and `tiny` may use `models.inspect` and `models.tiny`.
- serve/ never imports test or bench fixtures, nor the demo model's trainer and harness.
- A model family (models/registry.py, models/wan/) may use serve's generic mechanisms (pipeline,
  sampling, loader, quant, lora, vae, the request and message types) but not the engine loop,
  the worker, the API or the CLI.
- The registry and the specs import no torch and nothing from serve.
- The memory planner (serve.loader.planner) and the inspect report (models.inspect) do not
  import each other's way round: the report uses the planner, never the reverse.
- The stores (serve.jobs: job records, the work queue, artifacts) know requests and configs only:
  no engine loop, worker, API or model. The API's job service (serve.api.jobs) wires them to the
  engine; the worker opens an artifact store to write its videos.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAMILY_TORCH_FREE = ("models.registry", "models.wan.spec")
SERVE_MAY_USE_FROM_MODELS = FAMILY_TORCH_FREE
CLI_COMMANDS_FROM_MODELS = ("models.inspect", "models.tiny")
FAMILY_PACKAGES = ("models.registry", "models.wan")
SERVE_MECHANISMS = (
    "serve.pipeline",
    "serve.sampling",
    "serve.loader",
    "serve.quant",
    "serve.lora",
    "serve.vae",
    "serve.engine.request",
    "serve.engine.messages",
)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, absolute names (`from a import b` counts `a.b` when b is a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if is_module(f"{node.module}.{a.name}"))
    return found


def project_modules(*packages: str) -> dict[str, set[str]]:
    files = [p for package in packages for p in (ROOT / package).rglob("*.py")]
    return {module_name(p): imports_of(p) for p in files}


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations(modules: dict[str, set[str]], applies, forbidden) -> list[str]:
    return sorted(f"{m} imports {i}" for m, imps in modules.items() if applies(m) for i in imps if forbidden(m, i))


def test_the_scanner_sees_lazy_imports():
    """The checks below are only as good as the scanner: a function-level import must count."""
    imports = imports_of(ROOT / "serve" / "worker" / "factory.py")
    assert "serve.worker.model_runner" in imports  # imported inside load_model_runner


def test_serve_sees_a_model_family_only_through_registry_and_spec():
    def forbidden(module: str, imported: str) -> bool:
        if not within(imported, ("models",)) or within(imported, SERVE_MAY_USE_FROM_MODELS):
            return False
        return not (module == "serve.cli" and within(imported, CLI_COMMANDS_FROM_MODELS))

    assert violations(project_modules("serve"), lambda m: True, forbidden) == []


def test_nothing_in_serve_or_a_family_imports_fixtures_or_the_demo():
    fixtures = ("tests", "bench", "models.demo")
    found = violations(
        project_modules("serve", "models"),
        lambda m: not within(m, ("models.demo",)),
        lambda m, i: within(i, fixtures),
    )
    assert found == []


def test_a_family_uses_only_serves_generic_mechanisms():
    def forbidden(module: str, imported: str) -> bool:
        return within(imported, ("serve",)) and not within(imported, SERVE_MECHANISMS)

    assert violations(project_modules("models"), lambda m: within(m, FAMILY_PACKAGES), forbidden) == []


def test_registry_and_specs_are_torch_free_and_serve_free():
    def forbidden(module: str, imported: str) -> bool:
        return within(imported, ("torch", "diffusers", "transformers", "serve", "numpy"))

    assert violations(project_modules("models"), lambda m: within(m, FAMILY_TORCH_FREE), forbidden) == []


def test_the_stores_know_requests_and_configs_only():
    allowed = ("serve.jobs", "serve.engine.request", "serve.frozen")

    def forbidden(module: str, imported: str) -> bool:
        return within(imported, ("serve", "models", "torch")) and not within(imported, allowed)

    assert violations(project_modules("serve"), lambda m: within(m, ("serve.jobs",)), forbidden) == []


def test_planner_does_not_import_the_inspect_report():
    """The report uses the planner; the planner's memory model lives in serve/loader."""
    planner = project_modules("serve")["serve.loader.planner"]
    assert not any(within(i, ("models",)) for i in planner), sorted(planner)


@pytest.mark.parametrize(
    "modules",
    [
        "serve.api.app, serve.engine.client, serve.config, serve.engine.messages",
        "serve.api.server, serve.jobs.sqlite, serve.jobs.redis_store, serve.jobs.s3",
        "models.registry, models.wan.spec, serve.worker.runner, serve.worker.worker",
    ],
)
def test_the_api_process_imports_no_torch(modules):
    code = f"import sys, {modules}; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
