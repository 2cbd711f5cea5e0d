"""Issue 16, deliverables 1-3, checked with the official `openai` client against `reelserve serve`
run as users run it (tests/jobs/server_process.py: the real CLI, the fake runner in the worker):

- model identity: the model named by a Hugging Face id from a local cache (a fake one built here,
  HF_HUB_CACHE), served under `--served-model-name` aliases; `/v1/models`; an unknown `model` is
  OpenAI's 404, no `model` is fine;
- every extension field through `extra_body`, as the client posts it (multipart, scalars as text,
  nested lists flattened into `loras[][name]` parts): the params the engine runs (the job store's
  record, which the worker is handed) equal those of the same fields sent as JSON, the reference
  path that tests/api and tests/pipeline check against diffusers;
- completion: `create_and_poll` (paced by `openai-poll-after-ms`), download; a download before
  completion is a 404 that the client raises at once, without its retries.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import httpx2
import openai
import pytest

from serve.api.jobs import SQLITE_FILE
from serve.cli import main as reelserve
from serve.config import ServerConfig
from serve.engine.request import GenerationParams
from serve.jobs.records import JobRecord
from serve.pipeline.mp4 import decode_mp4
from tests.jobs.server_process import ServerProcess

HF_ID = "Wan-AI/Wan2.2-T2V-Tiny-Diffusers"
REVISION = "0123456789abcdef0123456789abcdef01234567"
ALIASES = ("wan-tiny", "sora-2")
LORAS = ("style", "detail")
SIZE = {"size": "48x32"}
# Every extension field of POST /v1/videos but preset and input_reference (tests below; an image
# needs an image model: tests/api/test_images.py), each away from its default.
FIELDS = {
    "negative_prompt": "blurry, dark",
    "num_frames": 9,
    "fps": 12,
    "num_inference_steps": 3,
    "guidance_scale": 2.5,
    "guidance_scale_2": 1.5,
    "seed": 1234,
    "sampler": "euler",
    "lossless": True,
    "loras": [{"name": "style", "scale": 0.5}, {"name": "detail", "scale": -1.25}],
}

# The openai SDK marks the Videos API deprecated (Sora's shutdown); the calls are what is tested.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def hf_cache(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face cache laid out as `hf download` leaves it (refs/main naming the revision,
    the snapshot's entries links into the checkpoint), holding the tiny checkpoint as HF_ID."""
    cache = tmp_path_factory.mktemp("hf-hub")
    repo = cache / f"models--{HF_ID.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    for entry in tiny_model_dir.iterdir():  # links: the session's checkpoint is never written to
        (snapshot / entry.name).symlink_to(entry)
    return cache


@pytest.fixture(scope="module")
def served_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("served")


@pytest.fixture(scope="module")
def server(hf_cache: Path, served_root: Path) -> Iterator[ServerProcess]:
    """`reelserve serve HF_ID --served-model-name wan-tiny --served-model-name sora-2 ...`."""
    root = served_root
    loras = root / "loras"
    loras.mkdir()
    for name in LORAS:  # the fake runner never reads them; the API checks the names exist
        (loras / f"{name}.safetensors").write_bytes(b"not read")
    flags = [f for name in ALIASES for f in ("--served-model-name", name)]
    flags += ["--lora-dir", str(loras), "--output-dir", str(root / "out")]
    process = ServerProcess(Path(HF_ID), *flags, env={"HF_HUB_CACHE": str(hf_cache)}, log=root / "server.log")
    process.argv.remove("--model")  # the positional form: `reelserve serve MODEL`
    with process:
        yield process


@pytest.fixture(scope="module")
def store(server: ServerProcess, served_root: Path) -> Iterator[sqlite3.Connection]:
    """The server's job store (serve/jobs/sqlite.py), opened read-only: the server holds its lock."""
    db = sqlite3.connect(f"file:{served_root / 'out' / SQLITE_FILE}?mode=ro", uri=True, timeout=30)
    yield db
    db.close()


def client_for(server: ServerProcess, **options) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", **{"max_retries": 0, **options})


def engine_params(store: sqlite3.Connection, video_id: str) -> GenerationParams:
    """What the worker is handed for this job: the params of its record in the job store."""
    (record,) = store.execute("SELECT record FROM jobs WHERE id = ?", (video_id,)).fetchone()
    return JobRecord.from_json(record).params


# --- model identity --------------------------------------------------------------------------


def test_a_hugging_face_id_resolves_offline_from_the_cache(hf_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_cache))
    config = ServerConfig(model_dir=HF_ID)
    assert config.model_dir == hf_cache / f"models--{HF_ID.replace('/', '--')}" / "snapshots" / REVISION
    assert config.model_names == (HF_ID,)  # the default name is the id, not the revision folder
    assert ServerConfig(model_dir=HF_ID, served_model_name=ALIASES).model_names == ALIASES


def test_a_missing_id_names_the_download_command(hf_cache, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_cache))
    assert reelserve(["serve", "Wan-AI/Not-Downloaded"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "hf download Wan-AI/Not-Downloaded" in err and "huggingface-cli download Wan-AI/Not-Downloaded" in err
    assert str(hf_cache) in err  # where it looked


def test_served_model_names_are_listed_and_the_first_is_reported(server):
    client = client_for(server)
    models = client.models.list().data
    assert [m.id for m in models] == list(ALIASES)
    assert {(m.object, m.owned_by, m.root) for m in models} == {("model", "reelserve", HF_ID)}
    assert client.models.retrieve("sora-2").id == "sora-2"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve(HF_ID)  # with aliases, the id is not a served name
    assert missing.value.body["param"] == "model" and missing.value.body["code"] == "model_not_found"

    by_alias = client.videos.create(prompt="a cat", model="sora-2", **SIZE, extra_body={"num_inference_steps": 1})
    unnamed = client.videos.create(prompt="a cat", **SIZE, extra_body={"num_inference_steps": 1})
    assert by_alias.model == unnamed.model == "wan-tiny"


def test_an_unknown_model_is_openais_404(server):
    with pytest.raises(openai.NotFoundError) as refused:
        client_for(server).videos.create(prompt="a cat", model="gpt-video-9")
    error = refused.value.body  # the client unwraps {"error": {...}}
    assert error["type"] == "invalid_request_error" and error["code"] == "model_not_found"
    assert error["param"] == "model" and "gpt-video-9" in error["message"]


def test_the_default_name_is_the_hugging_face_id(hf_cache, tmp_path):
    """Without --served-model-name the model is served as its id (a slash in /v1/models/{id})."""
    from tests.api.conftest import fake_server

    snapshot = hf_cache / f"models--{HF_ID.replace('/', '--')}" / "snapshots" / REVISION
    with fake_server(snapshot, output_dir=tmp_path) as live:
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
        assert client.models.retrieve(HF_ID).id == HF_ID
        job = client.videos.create(prompt="a cat", model=HF_ID, **SIZE, extra_body={"num_inference_steps": 1})
        assert job.model == HF_ID


# --- extension fields through the official client ----------------------------------------------


def test_what_the_client_posts(tmp_path):
    """The wire format the server must take, captured from the client itself: a form, scalars as
    text, a list of objects as `loras[][key]` parts grouped by key (not by item)."""
    seen: list[httpx2.Request] = []

    def capture(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return httpx2.Response(400, json={"error": {"message": "captured", "type": "x", "param": None, "code": None}})

    transport = httpx2.Client(transport=httpx2.MockTransport(capture))
    client = openai.OpenAI(base_url="http://capture.invalid/v1", api_key="k", max_retries=0, http_client=transport)
    with pytest.raises(openai.BadRequestError):
        client.videos.create(prompt="p", extra_body=FIELDS)
    parts = multipart_parts(seen[0])
    assert seen[0].headers["content-type"].startswith("multipart/form-data")
    assert ("seed", "1234") in parts and ("lossless", "true") in parts and ("guidance_scale", "2.5") in parts
    assert [p for p in parts if p[0].startswith("loras")] == [
        ("loras[][name]", "style"),
        ("loras[][name]", "detail"),
        ("loras[][scale]", "0.5"),
        ("loras[][scale]", "-1.25"),
    ]


def multipart_parts(request: httpx2.Request) -> list[tuple[str, str]]:
    """(name, text) of each part, in order, parsed with the stdlib's MIME parser."""
    from email.parser import BytesParser
    from email.policy import HTTP

    head = f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode()
    message = BytesParser(policy=HTTP).parsebytes(head + request.read())
    return [(p.get_param("name", header="content-disposition"), p.get_content()) for p in message.iter_parts()]


def test_every_extension_field_reaches_the_engine_as_json_would_send_it(server, store):
    client = client_for(server)
    via_client = client.videos.create(prompt="every field", **SIZE, extra_body=FIELDS)
    with httpx.Client(base_url=server.url, timeout=60) as http:
        via_json = http.post("/v1/videos", json={"prompt": "every field", **SIZE, **FIELDS}).json()
    params = engine_params(store, via_client.id)
    assert params == engine_params(store, via_json["id"])
    expected = {**FIELDS, "loras": (("style", 0.5), ("detail", -1.25)), "height": 32, "width": 48}
    assert {name: getattr(params, name) for name in expected} == expected


@pytest.mark.parametrize(
    "loras",
    [
        json.dumps([{"name": "style", "scale": 0.5}, {"name": "detail"}]),  # one JSON part: any mix of keys
        {"loras[0][name]": "style", "loras[0][scale]": "0.5", "loras[1][name]": "detail"},  # indexed keys
    ],
    ids=["json-part", "indexed"],
)
def test_loras_in_the_other_form_shapes(server, store, loras):
    extra = {"loras": loras} if isinstance(loras, str) else loras
    job = client_for(server).videos.create(prompt="loras", **SIZE, extra_body={"num_inference_steps": 1, **extra})
    assert engine_params(store, job.id).loras == (("style", 0.5), ("detail", 1.0))


def test_a_preset_through_extra_body_sets_the_schedule(server, store):
    job = client_for(server).videos.create(prompt="fast", **SIZE, extra_body={"preset": "lightning-4step"})
    params = engine_params(store, job.id)
    assert params.preset == "lightning-4step" and params.num_inference_steps == 4 and params.guidance_scale == 1.0


def test_loras_the_client_flattens_ambiguously_are_refused_naming_the_fix(server):
    """A scale on one LoRA of two: `loras[][scale]` cannot say which, so the server does not guess."""
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        client_for(server).videos.create(
            prompt="loras", extra_body={"loras": [{"name": "style", "scale": 0.5}, {"name": "detail"}]}
        )
    error = refused.value.body
    assert error["param"] == "loras" and "json.dumps" in error["message"] and "every item" in error["message"]


def test_bad_loras_json_and_mixed_shapes_are_422s(server):
    client = client_for(server)
    for extra, words in [
        ({"loras": "[{"}, "not valid JSON"),
        ({"loras": "[]", "loras[0][name]": "style"}, "both as one part and as loras[...]"),
        ({"loras[0][name]": "style", "loras[2][name]": "detail"}, "without gaps"),
        ({"loras": json.dumps([{"name": "style", "scale": "NaN"}])}, "finite"),
    ]:
        with pytest.raises(openai.UnprocessableEntityError) as refused:
            client.videos.create(prompt="loras", extra_body=extra)
        assert refused.value.body["param"].startswith("loras") and words in refused.value.body["message"], extra


# --- completion ----------------------------------------------------------------------------------


def test_create_and_poll_then_download(server):
    client = client_for(server)
    with httpx.Client(base_url=server.url, timeout=60) as http:
        job = http.post("/v1/videos", json={"prompt": "a cat", **SIZE, "num_inference_steps": 1}).json()
        assert 0 < int(http.get(f"/v1/videos/{job['id']}").headers["openai-poll-after-ms"]) <= 5000
    done = client.videos.create_and_poll(prompt="a cat", **SIZE, extra_body={**FIELDS, "loras": []})
    assert done.status == "completed" and done.progress == 100 and done.model == "wan-tiny", done.error
    frames, fps = decode_mp4(client.videos.download_content(done.id).read())
    assert frames.shape == (9, 32, 48, 3) and fps == 12


def test_downloading_before_completion_is_a_404_the_client_does_not_retry(server):
    requests: list[str] = []
    hooks = {"request": [lambda request: requests.append(request.url.path)]}
    client = client_for(server, max_retries=2, http_client=httpx2.Client(event_hooks=hooks))
    job = client.videos.create(prompt="sleep:30", **SIZE, extra_body={"num_inference_steps": 30})
    try:
        with pytest.raises(openai.NotFoundError) as early:
            client.videos.download_content(job.id)
        error = early.value.body
        assert error["code"] == "video_not_ready" and error["param"] == "video_id" and "poll" in error["message"]
        assert requests.count(f"/v1/videos/{job.id}/content") == 1  # not retried (a 409 was, twice)
    finally:
        client.videos.delete(job.id)
