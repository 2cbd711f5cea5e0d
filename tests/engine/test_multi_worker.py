"""Two CPU worker processes behind one engine: placement, affinity, and a worker dying."""

import pytest

from serve.engine.core import GenerationFailed
from serve.engine.request import GenerationParams
from serve.worker.factory import DEFAULT_RUNNER_FACTORY
from tests.engine.conftest import make_core
from tests.engine.test_core import wait_until

TIMEOUT_S = 120


def params(seed: int, prompt: str = "a red square", steps: int = 4) -> GenerationParams:
    return GenerationParams(prompt, "", 32, 32, 5, 8, steps, 4.0, 3.0, seed)


@pytest.fixture(scope="module")
def real_two_workers(tiny_model_dir):
    core = make_core(str(tiny_model_dir), factory=DEFAULT_RUNNER_FACTORY, workers=2, max_batch_size=4)
    core.start()
    yield core
    core.stop()


def test_both_workers_get_work_and_each_request_stays_on_one(real_two_workers):
    futures = [real_two_workers.add_request(params(seed=i))[1] for i in range(6)]
    results = [f.result(TIMEOUT_S) for f in futures]
    workers_per_request = [{worker for _, worker, _ in r.trace} for r in results]
    assert all(len(w) == 1 for w in workers_per_request)
    assert set().union(*workers_per_request) == {0, 1}
    assert all(r.mp4 for r in results)
    # every request took part in exactly one encode, 4 steps and one decode
    assert all([kind for kind, _, _ in r.trace].count("denoise") == 4 for r in results)


def test_a_request_that_kills_its_worker_twice_fails_and_the_engine_goes_on(tmp_path):
    core = make_core(str(tmp_path), workers=2, max_running_per_worker=1)  # fake runner
    core.start()
    try:
        _, dying = core.add_request(params(seed=1, prompt="exit"))
        _, other = core.add_request(params(seed=2, prompt="sleep:0.5"))
        with pytest.raises(GenerationFailed, match=r"worker process died \(worker \d, exit code 3\).*retried once"):
            dying.result(TIMEOUT_S)
        assert other.result(TIMEOUT_S).mp4  # on the other worker: untouched
        wait_until(core.is_healthy)  # the retry may have killed the other worker while the first reloaded
        _, after = core.add_request(params(seed=3))
        assert after.result(TIMEOUT_S).mp4
        # its first death, then its retry's (the second restart waits out the engine's backoff)
        wait_until(lambda: sum(w.restarts for w in core.executor.workers) == 2)
    finally:
        core.stop()
