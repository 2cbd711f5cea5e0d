"""Inputs no field may hold are a 422 naming the field, on both entry points; every error answer is
JSON in its API's shape; no answer names a host path; a record that cannot be rendered never
breaks a listing (issue 15, deliverables 1 and 2)."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from serve.api.errors import redact
from serve.engine.request import GenerationParams
from serve.jobs.records import JobRecord
from serve.lora.config import LoraConfig
from serve.lora.paths import LoraPathError, named_lora_files
from serve.lora.runtime import LoraRegistry
from serve.lora.weights import LoraError
from tests.api.conftest import fake_server

GOOD = {"prompt": "a red square", "height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 2}
NUMERIC = ["height", "width", "num_frames", "fps", "num_inference_steps", "guidance_scale", "guidance_scale_2", "seed"]
NON_FINITE = ["NaN", "Infinity", "-Infinity", "1e309"]


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("loras")
    (root / "broken.safetensors").write_bytes(b"\xff" * 64)  # no safetensors header
    return root


@pytest.fixture(scope="module")
def server(tiny_model_dir, lora_dir):
    with fake_server(tiny_model_dir, lora=LoraConfig(dirs=(lora_dir,))) as live:
        yield live


def post_raw(http, path: str, fields: dict, raw: dict[str, str]):
    """POST JSON whose `raw` fields are spliced in as literal JSON text (NaN, "\\ud800", ...): what a
    client's JSON library may send, and what httpx itself would refuse to encode."""
    pairs = [f"{json.dumps(name)}: {json.dumps(value)}" for name, value in fields.items()]
    body = "{" + ", ".join(pairs + [f'"{name}": {text}' for name, text in raw.items()]) + "}"
    return http.post(path, content=body.encode(), headers={"content-type": "application/json"})


def generate_errors(response) -> list[dict]:
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["type"] == "invalid_request"
    return body["detail"]


def openai_error(response, status: int = 422) -> dict:
    assert response.status_code == status, response.text
    (key,) = response.json()
    assert key == "error"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


@pytest.mark.parametrize("literal", NON_FINITE)
@pytest.mark.parametrize("field", NUMERIC)
def test_a_non_finite_number_in_any_numeric_field_is_422_naming_it(server, field, literal):
    with server.client() as http:
        errors = generate_errors(post_raw(http, "/generate", GOOD, {field: literal}))
        assert [e["loc"] for e in errors] == [["body", field]]
        assert errors[0]["type"] == "finite_number" and literal in errors[0]["msg"]
        error = openai_error(post_raw(http, "/v1/videos", {"prompt": "a cat"}, {field: literal}))
        assert error["param"] == field and error["code"] == "finite_number"


@pytest.mark.parametrize("literal", NON_FINITE)
def test_non_finite_lora_scale_and_seconds_are_422_naming_them(server, literal):
    lora = f'[{{"name": "style", "scale": {literal}}}]'
    with server.client() as http:
        errors = generate_errors(post_raw(http, "/generate", GOOD, {"loras": lora}))
        assert [e["loc"] for e in errors] == [["body", "loras", 0, "scale"]]
        error = openai_error(post_raw(http, "/v1/videos", {"prompt": "a cat"}, {"seconds": literal}))
        assert error["param"] == "seconds"


@pytest.mark.parametrize(
    ("field", "value"), [("guidance_scale_2", "NaN"), ("guidance_scale", "inf"), ("seconds", "nan"), ("height", "inf")]
)
def test_non_finite_numbers_in_multipart_form_fields_are_422(server, field, value):
    """The openai SDK posts forms: every value is text, which Python's float() would read as NaN."""
    with server.client() as http:
        # Parts without a filename: multipart/form-data text fields, as the SDK sends them.
        response = http.post("/v1/videos", files={"prompt": (None, "a cat"), field: (None, value)})
    assert openai_error(response)["param"] == field


@pytest.mark.parametrize("text", [r'"a\u0000b"', r'"\ud800"', r'"tail \udfff"'])
@pytest.mark.parametrize("field", ["prompt", "negative_prompt", "preset"])
def test_text_with_nul_or_a_lone_surrogate_is_422_naming_the_field(server, field, text):
    fields = {k: v for k, v in GOOD.items() if k != field}
    with server.client() as http:
        errors = generate_errors(post_raw(http, "/generate", fields, {field: text}))
        assert [e["loc"] for e in errors] == [["body", field]] and errors[0]["type"] == "string_unfit"
        others = {"prompt": "a cat"} if field != "prompt" else {}
        error = openai_error(post_raw(http, "/v1/videos", others, {field: text}))
        assert error["param"] == field


def test_a_nul_in_a_lora_name_or_a_bad_key_is_422(server):
    with server.client() as http:
        errors = generate_errors(post_raw(http, "/generate", GOOD, {"loras": r'[{"name": "sty\u0000le"}]'}))
        assert [e["loc"] for e in errors] == [["body", "loras", 0, "name"]]
        errors = generate_errors(post_raw(http, "/generate", GOOD, {r"\ud800": "1"}))
        assert "field name" in errors[0]["msg"]


def test_a_lone_surrogate_fails_only_its_own_request_and_listing_still_works(server):
    """Before: the bad prompt reached the text encoder and failed every request of its batch, and
    its stored record made GET /v1/videos a 500 for everyone."""
    with server.client() as http, ThreadPoolExecutor(6) as pool:
        good = [pool.submit(http.post, "/generate", json={**GOOD, "seed": i}) for i in range(3)]
        bad = pool.submit(post_raw, http, "/generate", {**GOOD, "prompt": "x"}, {"negative_prompt": r'"\ud800"'})
        bad_job = pool.submit(post_raw, http, "/v1/videos", {"size": "32x32"}, {"prompt": r'"a \ud800 cat"'})
        jobs = [pool.submit(http.post, "/v1/videos", json={"prompt": f"cat {i}", "size": "32x32"}) for i in range(2)]
        assert [f.result().status_code for f in good] == [200, 200, 200]
        assert bad.result().status_code == 422 and bad_job.result().status_code == 422
        assert all(f.result().status_code == 200 for f in jobs)
        listing = http.get("/v1/videos", params={"limit": 100})
    assert listing.status_code == 200
    assert {f.result().json()["id"] for f in jobs} <= {v["id"] for v in listing.json()["data"]}


def stored_record(server, job_id: str, **params) -> None:
    fields = {**GOOD, "negative_prompt": "", "fps": 16, "guidance_scale": 1.0, "guidance_scale_2": 1.0, "seed": 1}
    record = JobRecord(job_id, "wan22-tiny", GenerationParams(**{**fields, **params}), time.time(), status="failed")
    record.error = {"code": "generation_failed", "message": "RuntimeError: cannot open /srv/models/secret/x.bin"}
    server.app.state.jobs.store.create(record)


def test_a_record_that_cannot_be_rendered_never_breaks_the_listing(server):
    """Records as an older version, a damaged store or a bypassed check may leave them."""
    stored_record(server, "video_surrogate", prompt="a \ud800 cat")
    stored_record(server, "video_zero_fps", fps=0)  # its duration divides by zero
    with server.client() as http:
        listing = http.get("/v1/videos", params={"limit": 100})
        one = http.get("/v1/videos/video_surrogate")
    assert listing.status_code == 200, listing.text
    shown = {v["id"]: v for v in listing.json()["data"]}
    assert shown["video_surrogate"]["prompt"] == "a \ufffd cat"
    assert shown["video_zero_fps"]["status"] == "failed"
    assert shown["video_zero_fps"]["error"]["code"] == "unreadable_record"
    assert one.status_code == 200 and one.json()["prompt"] == "a \ufffd cat"
    # A failure reason from the worker keeps the file's name, not where the server keeps it.
    assert one.json()["error"]["message"] == "RuntimeError: cannot open x.bin"
    assert "/srv/models" not in listing.text


def test_framework_errors_are_json_in_each_apis_shape(server):
    with server.client() as http:
        plain_404 = http.get("/nope")
        assert plain_404.status_code == 404 and plain_404.json() == {"detail": "Not Found", "type": "not_found"}
        assert openai_error(http.get("/v1/nope"), 404)["type"] == "invalid_request_error"
        wrong_method = http.get("/generate")
        assert wrong_method.status_code == 405 and wrong_method.json()["type"] == "method_not_allowed"
        assert "POST" in wrong_method.headers["allow"]
        assert openai_error(http.put("/v1/videos"), 405)["message"] == "Method Not Allowed"
        assert openai_error(http.get("/v1/videos", params={"limit": 0}))["param"] == "limit"
        too_big = openai_error(http.post("/v1/videos", content=b"x" * (2 << 20)), 413)
        assert too_big["code"] == "request_too_large"
        not_json = generate_errors(http.post("/generate", content=b"{", headers={"content-type": "application/json"}))
        assert not_json[0]["type"] == "json_invalid"


def test_lora_refusals_name_the_lora_not_the_host_path(server, lora_dir):
    with server.client() as http:
        missing = http.post("/generate", json={**GOOD, "loras": [{"name": "nope"}]})
        escape = http.post("/v1/videos", json={"prompt": "a cat", "loras": [{"name": "../../etc/passwd"}]})
    (error,) = generate_errors(missing)
    assert error["msg"] == "LoRA 'nope' was not found in the LoRA directories"
    assert "leaves the LoRA directory" in openai_error(escape)["message"]
    for text in (missing.text, escape.text):
        assert str(lora_dir) not in text and str(lora_dir.parent) not in text


def test_a_corrupt_lora_file_fails_naming_the_lora_not_its_path(lora_dir):
    """The worker's message (it reaches the client as the request's failure reason)."""
    registry = LoraRegistry([lora_dir], [torch.nn.Linear(4, 4)])
    with pytest.raises(LoraError) as raised:
        registry.for_expert((("broken", 1.0),), 0)
    assert str(raised.value).startswith("LoRA 'broken' (broken.safetensors): not a readable safetensors file")
    assert str(lora_dir) not in str(raised.value)
    (lora_dir / "escape.safetensors").symlink_to("/etc/hostname")
    with pytest.raises(LoraPathError) as raised:
        named_lora_files("escape", [lora_dir], 1)
    assert str(raised.value) == "LoRA 'escape' resolves outside the LoRA directories (a symlink out of them?)"


def test_redact_keeps_the_last_component_of_host_paths_only():
    assert redact("cannot open /srv/models/wan/x.safetensors (errno 2)") == "cannot open x.safetensors (errno 2)"
    assert redact("'/tmp/pytest-1/loras/style' missing") == "'style' missing"
    for kept in ("size WIDTHxHEIGHT", "see https://example.com/a/b", "lora_down/lora_A", "data:image/png;base64"):
        assert redact(kept) == kept


def test_the_openapi_document_defines_every_body_and_status(server):
    with server.client() as http:
        doc = http.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    for name in ("GenerateRequest", "VideoCreateRequest", "VideoObject", "VideoList", "ErrorResponse", "OpenAIError"):
        assert name in schemas
    refs = set()

    def walk(node):
        if isinstance(node, dict):
            refs.update(v.rsplit("/", 1)[-1] for k, v in node.items() if k == "$ref")
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    assert refs <= set(schemas), refs - set(schemas)
    statuses = {(path, verb): set(op["responses"]) for path, ops in doc["paths"].items() for verb, op in ops.items()}
    assert {"200", "413", "422", "429", "500", "503"} <= statuses[("/generate", "post")]
    assert {"200", "404", "413", "422", "429", "500", "503"} <= statuses[("/v1/videos", "post")]
    content = statuses[("/v1/videos/{video_id}/content", "get")]
    assert {"200", "307", "404", "410"} <= content and "409" not in content  # the openai client retries a 409
    assert {"200", "404"} <= statuses[("/v1/models/{model_id}", "get")] and "200" in statuses[("/v1/models", "get")]
    assert {"200", "404"} <= statuses[("/v1/videos/{video_id}", "delete")]
    assert {"200", "503"} <= statuses[("/health", "get")]


def test_the_server_takes_exactly_the_bodies_the_schema_allows(server):
    """The edges schemathesis found: JSON Schema's integer 7.0, a form's boolean, strict JSON types,
    and `seconds` beyond the frame limit at the request's frame rate (shortened, and said so)."""
    with server.client() as http:
        integral = http.post("/generate", json={**GOOD, "seed": 7.0})
        assert integral.status_code == 200 and integral.headers["x-reelserve-seed"] == "7"
        text_height = openai_error(http.post("/v1/videos", json={"prompt": "a cat", "height": "64"}))
        assert text_height["param"] == "height"
        flag = openai_error(http.post("/v1/videos", files={"prompt": (None, "a cat"), "lossless": (None, "0")}))
        assert flag["param"] == "lossless"
        size_and_width = openai_error(http.post("/v1/videos", json={"prompt": "a cat", "size": "064x64", "width": 32}))
        assert size_and_width["param"] == "size"
        long = http.post("/v1/videos", json={"prompt": "a cat", "seconds": "100", "size": "32x32", "fps": 16})
        assert long.status_code == 200, long.text
        assert long.json()["seconds"] == "8.0625" and long.json()["size"] == "32x32"
        assert "num_frames=1601->129" in long.json()["adjustments"][0]
        http.delete(f"/v1/videos/{long.json()['id']}")


def test_a_number_too_long_to_read_or_a_body_that_is_not_utf8_is_422(server):
    with server.client() as http:
        errors = generate_errors(post_raw(http, "/generate", GOOD, {"seed": "1" + "0" * 5000}))
        assert [e["loc"] for e in errors] == [["body", "seed"]] and "5001 digits" in errors[0]["msg"]
        not_utf8 = http.post("/generate", content=b'{"prompt": "\xff"}', headers={"content-type": "application/json"})
        assert generate_errors(not_utf8)[0]["loc"] == ["body"]


def test_a_form_that_cannot_be_parsed_is_422_like_bad_json(server):
    """Starlette answers 400 for broken multipart; the API documents one status for a bad body."""
    broken = b"--b\r\nFalse--b--\r\n"
    headers = {"content-type": "multipart/form-data; boundary=b"}
    with server.client() as http:
        assert generate_errors(http.post("/generate", content=broken, headers=headers))[0]["type"] == "form_invalid"
        assert openai_error(http.post("/v1/videos", content=broken, headers=headers))["code"] == "form_invalid"


def test_with_api_keys_the_schema_states_the_bearer_scheme_and_the_401s(tiny_model_dir, tmp_path):
    from serve.api.app import create_app
    from serve.api.config import AccessConfig
    from serve.config import ServerConfig

    config = ServerConfig(model_dir=tiny_model_dir, output_dir=tmp_path, access=AccessConfig(api_keys=("k" * 16,)))
    doc = create_app(config).openapi()  # built from the routes: no server, no worker
    assert doc["components"]["securitySchemes"]["apiKey"] == {
        "type": "http", "scheme": "bearer", "description": "One of the server's --api-key values"
    }
    for path, operations in doc["paths"].items():
        for operation in operations.values():
            keyed = path not in ("/health", "/ready")
            assert ("401" in operation["responses"]) == keyed and ("security" in operation) == keyed, path
    unauthorized = doc["paths"]["/v1/videos"]["post"]["responses"]["401"]["content"]["application/json"]
    assert unauthorized["schema"]["$ref"].endswith("/OpenAIError")
