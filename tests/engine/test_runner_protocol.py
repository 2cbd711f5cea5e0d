"""The real runner and the test fake implement the same `Runner` protocol, method for method, so
engine and API tests with the fake drive the production worker and decode path."""

import inspect

import pytest

from serve.worker.model_runner import ModelRunner
from serve.worker.runner import Runner
from tests.engine.fake_runner import FakeRunner

PROTOCOL_METHODS = [name for name, value in vars(Runner).items() if inspect.isfunction(value) and name[0] != "_"]


def test_the_protocol_names_the_worker_verbs():
    assert sorted(PROTOCOL_METHODS) == [
        "calibrate",
        "counters",
        "decode_chunks",
        "denoise_step",
        "experts_of",
        "start",
    ]


@pytest.mark.parametrize("cls", [ModelRunner, FakeRunner])
@pytest.mark.parametrize("method", PROTOCOL_METHODS)
def test_each_runner_has_each_method_with_the_protocols_parameters(cls, method):
    expected = list(inspect.signature(getattr(Runner, method)).parameters)
    assert list(inspect.signature(getattr(cls, method)).parameters) == expected


def test_the_fake_is_a_runner_at_runtime():
    assert isinstance(FakeRunner(), Runner)
