"""API keys (401 without one, each caller sees and deletes only its own jobs, docs and metrics
behind the key unless opened) and connection deadlines (a slowloris header or a stalled body is
closed, not held). A live server with the fake runner in its worker."""

from __future__ import annotations

import socket
import time

import httpx
import openai
import pytest

from serve.api.access import matching_key, tenant_of, with_header_timeout
from serve.api.app import create_app
from serve.api.config import AccessConfig
from serve.config import ServerConfig
from serve.engine.client import EngineClient
from tests.api.conftest import LiveServer
from tests.engine.fake_runner import FACTORY

ALICE, BOB = "alice-key-0123456789", "bob-key-0123456789"
SIZE = {"width": 32, "height": 32, "num_frames": 5, "num_inference_steps": 2}
TIMEOUT_S = 120  # guards against hangs only


def keyed_server(model_dir, tmp_path, **access) -> LiveServer:
    config = ServerConfig(model_dir=model_dir, output_dir=tmp_path, access=AccessConfig(**access))
    app = create_app(config, EngineClient(config, runner_factory=FACTORY))
    return LiveServer(
        app,
        http=with_header_timeout(config.access.header_timeout_s),
        timeout_keep_alive=config.access.keep_alive_timeout_s,
    )


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    with keyed_server(tiny_model_dir, tmp_path_factory.mktemp("keyed"), api_keys=(ALICE, BOB)) as live:
        yield live


def as_(key: str | None) -> dict[str, str]:
    return {} if key is None else {"Authorization": f"Bearer {key}"}


def test_every_route_but_the_probes_needs_a_key(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for key in (None, "wrong-key-0123456789"):
            generate = http.post("/generate", json={"prompt": "a cat", **SIZE}, headers=as_(key))
            assert generate.status_code == 401 and generate.json()["type"] == "unauthorized"
            assert generate.headers["www-authenticate"].startswith("Bearer")
            videos = http.get("/v1/videos", headers=as_(key))
            assert videos.status_code == 401 and videos.json()["error"]["code"] == "invalid_api_key"
            for path in ("/metrics", "/docs", "/openapi.json", "/v1/models"):
                assert http.get(path, headers=as_(key)).status_code == 401, path
        assert http.get("/health").status_code == 200 and http.get("/ready").status_code == 200
        assert http.post("/generate", json={"prompt": "a cat", **SIZE}, headers=as_(ALICE)).status_code == 200
        assert http.get("/metrics", headers=as_(BOB)).status_code == 200
        assert http.get("/v1/models", headers=as_(BOB)).json()["data"][0]["object"] == "model"


def test_a_caller_sees_and_deletes_only_its_own_jobs(server):
    alice = openai.OpenAI(base_url=f"{server.url}/v1", api_key=ALICE, max_retries=0)
    bob = openai.OpenAI(base_url=f"{server.url}/v1", api_key=BOB, max_retries=0)
    job = alice.videos.create(prompt="a cat", size="32x32", extra_body={"num_frames": 5, "num_inference_steps": 2})
    deadline = time.monotonic() + TIMEOUT_S
    while alice.videos.retrieve(job.id).status != "completed":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert job.id in [v.id for v in alice.videos.list().data]
    assert job.id not in [v.id for v in bob.videos.list().data]
    for attempt in (lambda: bob.videos.retrieve(job.id), lambda: bob.videos.download_content(job.id)):
        with pytest.raises(openai.NotFoundError):  # another caller's job does not exist for Bob
            attempt()
    with pytest.raises(openai.NotFoundError):
        bob.videos.delete(job.id)
    assert alice.videos.download_content(job.id).read()[4:8] == b"ftyp"  # still there
    assert alice.videos.delete(job.id).deleted


def test_keys_from_a_file_and_the_flags(tmp_path):
    # REELSERVE_API_KEYS is read by `reelserve serve` like every setting: tests/test_config_file.py
    keys = tmp_path / "keys"
    keys.write_text("# operators\nfile-key-0123456789\n\n")
    config = AccessConfig(api_key_file=keys, api_keys=("env-key-0123456789", "other-key-0123456789"))
    assert set(config.keys()) == {"file-key-0123456789", "env-key-0123456789", "other-key-0123456789"}
    with pytest.raises(ValueError, match="cannot read the API key file"):
        AccessConfig(api_key_file=tmp_path / "missing")
    with pytest.raises(ValueError, match="shorter than 8"):
        AccessConfig(api_keys=("short",)).keys()


def test_keys_are_matched_whole_and_tenants_hide_the_key():
    keys = (ALICE, BOB)
    assert matching_key(BOB, keys) == BOB and matching_key(ALICE[:-1], keys) is None
    assert matching_key("", keys) is None and matching_key(ALICE + "x", keys) is None
    assert tenant_of(ALICE) != tenant_of(BOB) and ALICE not in tenant_of(ALICE)


def test_open_metrics_leaves_metrics_and_docs_open(tiny_model_dir, tmp_path):
    with keyed_server(tiny_model_dir, tmp_path, api_keys=(ALICE,), open_metrics=True) as live:
        assert httpx.get(f"{live.url}/metrics").status_code == 200
        assert httpx.get(f"{live.url}/openapi.json").status_code == 200
        assert httpx.get(f"{live.url}/v1/videos").status_code == 401


def closed_within(sock: socket.socket, guard_s: float) -> bool:
    """Whether the server closed the connection (recv returns b"" or resets) before `guard_s`."""
    sock.settimeout(guard_s)
    try:
        while sock.recv(4096):
            pass  # a response (e.g. the 408/500 of a dropped body) may come first; then the close
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def test_slow_headers_and_stalled_bodies_are_closed(tiny_model_dir, tmp_path):
    with keyed_server(tiny_model_dir, tmp_path, header_timeout_s=1.0, body_timeout_s=1.0) as live:
        port = int(live.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as slowloris:
            slowloris.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # and never the rest
            assert closed_within(slowloris, TIMEOUT_S)
        with socket.create_connection(("127.0.0.1", port)) as stalled:
            head = b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            head += b"Content-Length: 100\r\n\r\n"
            stalled.sendall(head + b'{"prompt": ')  # 11 of 100 bytes, then silence
            assert closed_within(stalled, TIMEOUT_S)
        with socket.create_connection(("127.0.0.1", port)) as idle:
            assert closed_within(idle, TIMEOUT_S)  # connected, sent nothing: the header deadline
        assert httpx.get(f"{live.url}/health").status_code == 200  # and the server serves on
        # The body deadline ends with the body: a video that takes longer than it still arrives.
        slow = httpx.post(f"{live.url}/generate", json={"prompt": "sleep:3", **SIZE}, timeout=TIMEOUT_S)
        assert slow.status_code == 200 and slow.content[4:8] == b"ftyp"
