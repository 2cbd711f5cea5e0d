"""Job events to the operator's webhook URLs, as Standard Webhooks: `video.completed` and
`video.failed`, each signed (`webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<HMAC>`)
so that the official client's `client.webhooks.unwrap(body, headers, secret=...)` verifies them.

Only URLs the operator configured are ever called (`--webhook-url`); nothing a request carries
names a destination. Deliveries run on their own thread, each retried with exponential backoff
until it is answered 2xx or its attempts run out; a slow or dead receiver never holds a job up.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass

import httpx

log = logging.getLogger(__name__)
EVENT_TYPES = {"completed": "video.completed", "failed": "video.failed"}
DELIVERY_TIMEOUT_S = 10.0


def signing_key(secret: str) -> bytes:
    """Standard Webhooks secrets are `whsec_` + base64; anything else is used as raw bytes."""
    return base64.b64decode(secret.removeprefix("whsec_")) if secret.startswith("whsec_") else secret.encode()


def signed_headers(secret: str, event_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    signed = f"{event_id}.{timestamp}.".encode() + body
    signature = base64.b64encode(hmac.new(signing_key(secret), signed, hashlib.sha256).digest()).decode()
    return {
        "webhook-id": event_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": f"v1,{signature}",
        "content-type": "application/json",
    }


def video_event(kind: str, job_id: str, now: float | None = None) -> tuple[str, bytes]:
    """The event id and body of a job that ended `kind` ("completed" or "failed"), in the shape
    of OpenAI's video events (the receiver fetches the job for details)."""
    event_id = f"evt_{uuid.uuid4().hex}"
    created = int(time.time() if now is None else now)
    body = {"id": event_id, "object": "event", "type": EVENT_TYPES[kind], "created_at": created, "data": {"id": job_id}}
    return event_id, json.dumps(body).encode()


@dataclass(frozen=True)
class Delivery:
    url: str
    event_id: str
    body: bytes
    attempt: int = 0
    due: float = 0.0  # monotonic time of the next try


class WebhookSender:
    """Delivers events to the configured URLs from one background thread."""

    def __init__(self, urls: tuple[str, ...], secret: str, attempts: int = 6, backoff_s: float = 1.0) -> None:
        self.urls, self.secret, self.attempts, self.backoff_s = urls, secret, attempts, backoff_s
        self._queue: queue.Queue[Delivery | None] = queue.Queue()
        self._waiting: list[Delivery] = []  # retries not yet due
        self._thread = threading.Thread(target=self._run, name="reelserve-webhooks", daemon=True)

    def start(self) -> None:
        if self.urls and not self._thread.is_alive():
            self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(DELIVERY_TIMEOUT_S * 2)

    def job_ended(self, status: str, job_id: str) -> None:
        if status not in EVENT_TYPES or not self.urls:
            return
        event_id, body = video_event(status, job_id)
        for url in self.urls:
            self._queue.put(Delivery(url, event_id, body))

    def _run(self) -> None:
        with httpx.Client(timeout=DELIVERY_TIMEOUT_S, follow_redirects=False) as http:
            while True:
                wait = min((d.due for d in self._waiting), default=None)
                timeout = None if wait is None else max(0.0, wait - time.monotonic())
                try:
                    item = self._queue.get(timeout=timeout)
                except queue.Empty:
                    item = ...
                if item is None:
                    return
                if isinstance(item, Delivery):
                    self._waiting.append(item)
                now = time.monotonic()
                due = [d for d in self._waiting if d.due <= now]
                self._waiting = [d for d in self._waiting if d.due > now]
                for delivery in due:
                    self._deliver(http, delivery)

    def _deliver(self, http: httpx.Client, delivery: Delivery) -> None:
        # Signed at each try: the timestamp is the send time (receivers reject stale ones).
        headers = signed_headers(self.secret, delivery.event_id, int(time.time()), delivery.body)
        try:
            response = http.post(delivery.url, content=delivery.body, headers=headers)
            if 200 <= response.status_code < 300:
                return
            problem = f"answered {response.status_code}"
        except httpx.HTTPError as e:
            problem = type(e).__name__
        attempt = delivery.attempt + 1
        if attempt >= self.attempts:
            log.error(
                "webhook %s to %s gave up after %d attempts (%s)", delivery.event_id, delivery.url, attempt, problem
            )
            return
        delay = self.backoff_s * 2 ** (attempt - 1)
        log.warning("webhook %s to %s %s; retrying in %.0f s", delivery.event_id, delivery.url, problem, delay)
        self._waiting.append(
            Delivery(delivery.url, delivery.event_id, delivery.body, attempt, time.monotonic() + delay)
        )
