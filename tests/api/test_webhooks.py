"""Webhooks: a job's end reaches the operator's URL as a Standard Webhooks event that the official
client's `client.webhooks.unwrap()` verifies; a receiver that fails is retried; only configured
URLs are called. The receiver is a real HTTP server on loopback in this test process."""

from __future__ import annotations

import base64
import hashlib
import hmac
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest

from serve.jobs.config import JobsConfig
from serve.jobs.webhooks import signed_headers
from tests.api.conftest import fake_server

SECRET = "whsec_" + base64.b64encode(b"a receiver's shared secret").decode()
SIZE = {"width": 32, "height": 32, "num_frames": 5, "num_inference_steps": 2}
TIMEOUT_S = 120  # guards against hangs only


class Receiver:
    """Collects deliveries; answers 500 to the first `fail_first` of them."""

    def __init__(self, fail_first: int = 0) -> None:
        self.deliveries: list[tuple[bytes, dict[str, str]]] = []
        self.fail_first = fail_first
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.deliveries.append((body, dict(self.headers.items())))
                self.send_response(500 if len(receiver.deliveries) <= receiver.fail_first else 200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, count: int) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while len(self.deliveries) < count:
            assert time.monotonic() < deadline, f"{len(self.deliveries)} of {count} deliveries arrived"
            time.sleep(0.05)

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def receiver():
    r = Receiver(fail_first=1)
    yield r
    r.close()


def test_job_events_are_signed_verified_by_the_official_client_and_retried(tiny_model_dir, tmp_path, receiver):
    jobs = JobsConfig(webhook_urls=(receiver.url,), webhook_secret=SECRET)
    with fake_server(tiny_model_dir, output_dir=tmp_path, jobs=jobs) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, webhook_secret=SECRET)
        done = client.videos.create(
            prompt="a cat", size="32x32", extra_body={"num_frames": 5, "num_inference_steps": 2}
        )
        receiver.wait_for(2)  # the first try was answered 500, then it came again
        failed = client.videos.create(
            prompt="raise", size="32x32", extra_body={"num_frames": 5, "num_inference_steps": 2}
        )
        receiver.wait_for(3)
    events = [client.webhooks.unwrap(body, headers) for body, headers in receiver.deliveries]
    assert [(e.type, e.data.id) for e in events] == [
        ("video.completed", done.id),
        ("video.completed", done.id),  # the retry: the same event, signed again
        ("video.failed", failed.id),
    ]
    assert events[0].id == events[1].id != events[2].id
    with pytest.raises(openai.InvalidWebhookSignatureError):  # a forged body does not verify
        body, headers = receiver.deliveries[2]
        client.webhooks.unwrap(body.replace(failed.id.encode(), done.id.encode()), headers)


def test_the_signature_is_standard_webhooks():
    """Known answer: HMAC-SHA256 over `id.timestamp.body` with the base64-decoded secret."""
    headers = signed_headers("whsec_" + base64.b64encode(b"key").decode(), "evt_1", 1700000000, b'{"a":1}')
    expected = base64.b64encode(hmac.new(b"key", b'evt_1.1700000000.{"a":1}', hashlib.sha256).digest()).decode()
    assert headers["webhook-signature"] == f"v1,{expected}" and headers["webhook-id"] == "evt_1"
    assert headers["webhook-timestamp"] == "1700000000"


@pytest.mark.parametrize("urls", [("ftp://example.invalid/x",), ("not a url",)])
def test_only_http_urls_with_a_secret_are_accepted(urls):
    with pytest.raises(ValueError, match="not an http"):
        JobsConfig(webhook_urls=urls, webhook_secret=SECRET)
    with pytest.raises(ValueError, match="needs --webhook-secret"):
        JobsConfig(webhook_urls=("http://127.0.0.1:9/x",))
