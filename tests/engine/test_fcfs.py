"""FcfsPolicy as pure data: requests in, worker events in, state out."""

from serve.engine.core import FcfsPolicy
from serve.engine.executor import RequestDone, RequestFailed, StepProgress
from serve.engine.request import Request, RequestStatus
from tests.engine.test_core import params


def test_one_request_at_a_time_in_arrival_order():
    policy = FcfsPolicy()
    first, second = Request(params()), Request(params())
    policy.add_request(first)
    policy.add_request(second)
    assert policy.schedule() == [first] and first.status == RequestStatus.RUNNING
    assert policy.schedule() == []  # the worker is busy
    assert policy.update_from_output([StepProgress(first.request_id, 2, 3)]) == []
    assert first.step == 2
    assert policy.update_from_output([RequestDone(first.request_id, b"mp4", {})]) == [first]
    assert first.status == RequestStatus.FINISHED
    assert policy.schedule() == [second]


def test_failure_records_reason_and_unknown_ids_are_ignored():
    policy = FcfsPolicy()
    request = Request(params())
    policy.add_request(request)
    policy.schedule()
    events = [RequestFailed("req-unknown", "x"), RequestFailed(request.request_id, "boom")]
    assert policy.update_from_output(events) == [request]
    assert request.status == RequestStatus.FAILED and request.error == "boom"


def test_abort_only_touches_waiting_requests():
    policy = FcfsPolicy()
    running, waiting = Request(params()), Request(params())
    policy.add_request(running)
    policy.add_request(waiting)
    policy.schedule()
    assert policy.abort(running.request_id) is None
    assert policy.abort(waiting.request_id) is waiting and waiting.status == RequestStatus.CANCELLED
    assert list(policy.waiting) == [] and running.request_id in policy.running
