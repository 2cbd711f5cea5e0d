"""The ArtifactStore contract (serve/jobs/artifacts.py), one test body run against every store: a
local directory and S3 (a real SeaweedFS server on loopback)."""

from __future__ import annotations

import multiprocessing
import pickle
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from serve.jobs.artifacts import CHUNK, ArtifactStore, ArtifactStoreError, ArtifactTarget, LocalArtifactStore
from serve.jobs.records import image_key, video_key
from serve.jobs.s3 import S3ArtifactStore
from tests.services import S3Service, free_port

VIDEO = bytes(range(256)) * (CHUNK * 5 // 2 // 256)  # 2.5 chunks: streamed in three pieces


@pytest.fixture(params=["local", "s3"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactTarget:
    """How a worker would be told where the store is (what crosses to worker processes)."""
    if request.param == "local":
        return ArtifactTarget(str(tmp_path / "artifacts"))
    service: S3Service = request.getfixturevalue("s3_service")
    return ArtifactTarget(service.url(), service.endpoint_url)


@pytest.fixture
def store(target: ArtifactTarget) -> ArtifactStore:
    return target.open()


def test_implements_the_protocol_and_checks(store: ArtifactStore) -> None:
    assert isinstance(store, ArtifactStore)
    store.check()
    assert store.location


def test_put_get_size_stream_delete(store: ArtifactStore) -> None:
    key = image_key("video_a")
    assert store.get_bytes(key) is None and store.size(key) is None and store.stream(key) is None
    store.put_bytes(key, b"rgb" * 100)
    assert store.get_bytes(key) == b"rgb" * 100
    assert store.size(key) == 300
    assert b"".join(store.stream(key)) == b"rgb" * 100
    store.delete(key)
    assert store.get_bytes(key) is None and store.size(key) is None
    store.delete(key)  # a missing key is not an error


def test_writing_stores_the_file_when_the_block_ends(store: ArtifactStore) -> None:
    key = video_key("video_a")
    with store.writing(key) as path:
        path.write_bytes(VIDEO)
        assert store.get_bytes(key) is None  # nothing under the key while it is being written
    assert not path.exists()  # the local file is gone either way
    assert store.size(key) == len(VIDEO)
    chunks = list(store.stream(key))
    assert b"".join(chunks) == VIDEO
    assert len(chunks) > 1 and all(len(c) <= CHUNK for c in chunks)


def test_a_write_that_raises_leaves_nothing(store: ArtifactStore) -> None:
    key = video_key("video_a")
    with pytest.raises(RuntimeError, match="encoder died"), store.writing(key) as path:
        path.write_bytes(VIDEO[: CHUNK // 2])
        raise RuntimeError("encoder died")
    assert not path.exists()
    assert store.get_bytes(key) is None and store.size(key) is None and store.stream(key) is None


def test_a_worker_process_opens_the_same_store(target: ArtifactTarget, store: ArtifactStore) -> None:
    """Workers are spawned processes: they get the picklable target and open the store themselves."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        pool.apply(_write_in_worker, (pickle.loads(pickle.dumps(target)), video_key("video_w")))
    assert store.get_bytes(video_key("video_w")) == b"from a worker"


def _write_in_worker(target: ArtifactTarget, key: str) -> None:
    with target.open().writing(key) as path:
        path.write_bytes(b"from a worker")


def test_url_is_presigned_where_the_store_has_them(store: ArtifactStore) -> None:
    key = video_key("video_a")
    store.put_bytes(key, VIDEO)
    url = store.url(key, ttl_s=60)
    if isinstance(store, LocalArtifactStore):
        assert url is None
        return
    with urllib.request.urlopen(url, timeout=60) as response:  # no credentials: the signature is all
        assert response.read() == VIDEO
    with pytest.raises(urllib.error.HTTPError) as refused:  # and without it, no access
        urllib.request.urlopen(url.split("?")[0], timeout=60)
    assert refused.value.code == 403


# ---- S3 only ------------------------------------------------------------------------------------


def test_s3_keys_live_under_the_prefix(s3_service: S3Service) -> None:
    store = S3ArtifactStore.from_url(s3_service.url("some/prefix"), s3_service.endpoint_url)
    assert store.location == f"s3://{s3_service.bucket}/some/prefix"
    store.put_bytes(video_key("video_a"), b"mp4")
    head = s3_service.client().head_object(Bucket=s3_service.bucket, Key="some/prefix/videos/video_a.mp4")
    assert head["ContentLength"] == 3
    store.delete(video_key("video_a"))


def test_s3_a_video_above_the_multipart_threshold(s3_service: S3Service) -> None:
    """Real videos are tens of MB: boto3 uploads them in parts (8 MiB by default)."""
    store = S3ArtifactStore.from_url(s3_service.url(), s3_service.endpoint_url)
    video = VIDEO * 4  # 10 MiB
    with store.writing(video_key("video_big")) as path:
        path.write_bytes(video)
    assert store.size(video_key("video_big")) == len(video)
    assert b"".join(store.stream(video_key("video_big"))) == video


def test_s3_store_pickles_without_its_client(s3_service: S3Service) -> None:
    store = S3ArtifactStore.from_url(s3_service.url(), s3_service.endpoint_url)
    store.put_bytes("a", b"x")  # makes the client
    copy = pickle.loads(pickle.dumps(store))
    assert copy.get_bytes("a") == b"x" and copy.location == store.location


def test_s3_check_names_a_missing_bucket(s3_service: S3Service) -> None:
    store = S3ArtifactStore.from_url("s3://reelserve-no-such-bucket/videos", s3_service.endpoint_url)
    with pytest.raises(ArtifactStoreError) as caught:
        store.check()
    message = str(caught.value)
    assert "s3://reelserve-no-such-bucket/videos" in message
    assert "does not exist" in message and "mb s3://reelserve-no-such-bucket" in message


def test_s3_unreachable_is_an_artifact_store_error(s3_service: S3Service) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    store = S3ArtifactStore.from_url(f"s3://{s3_service.bucket}/x", endpoint)
    with pytest.raises(ArtifactStoreError, match=f"s3://{s3_service.bucket}/x"):
        store.check()
    with pytest.raises(ArtifactStoreError, match=f"s3://{s3_service.bucket}/x"):
        store.get_bytes("a")


def test_s3_url_must_name_a_bucket() -> None:
    with pytest.raises(ValueError, match="s3://BUCKET"):
        S3ArtifactStore.from_url("s3:///prefix")
    assert S3ArtifactStore.from_url("s3://bucket").location == "s3://bucket"
