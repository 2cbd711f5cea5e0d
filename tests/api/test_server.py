import sys

from serve.api.server import DrainingServer, run_server
from serve.config import ServerConfig


def test_run_server_serves_the_app_on_the_configured_address(tiny_model_dir, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(DrainingServer, "run", lambda self: calls.append(self))
    run_server(ServerConfig(model_dir=tiny_model_dir, host="0.0.0.0", port=8123, output_dir=tmp_path))
    [server] = calls
    assert {"/generate", "/health"} <= set(server.config.app.openapi()["paths"])
    assert (server.config.host, server.config.port) == ("0.0.0.0", 8123)
    server.engine.stop()  # uvicorn's lifespan would have; the workers were started by run_server
    server.jobs.store.close()


def test_the_http_process_imports_no_torch():
    """The API and engine loop only enqueue and wait; torch belongs in the worker process."""
    import subprocess

    code = "import sys, serve.api.server, serve.engine.client; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
