"""The scheduler alone, fed hand-written worker reports (no processes, no torch)."""

import subprocess
import sys

import pytest

from serve.engine.cost_model import CostModel
from serve.engine.request import GenerationParams, Request, RequestStatus
from serve.engine.scheduler import (
    MovedToLane,
    QueueFullError,
    Scheduler,
    SchedulerConfig,
    UnitResult,
    WorkerDied,
    WorkUnit,
)
from tests.engine.fake_runner import fake_experts
from tests.requests import tokens


def params(steps: int = 4, height: int = 64, cfg: bool = True, seed: int = 0) -> GenerationParams:
    g = 4.0 if cfg else 1.0
    return GenerationParams("p", "", height, 64, 9, 16, steps, g, g, seed)


def add(s: Scheduler, p: GenerationParams, at: float) -> Request:
    r = Request(p, arrival_time=at)
    s.add_request(r)
    return r


def report(unit: WorkUnit, s: Scheduler) -> UnitResult:
    """What a healthy worker answers for `unit`."""
    if unit.kind == "encode":
        experts = {rid: fake_experts(s.requests[rid].params.num_inference_steps) for rid in unit.request_ids}
        return UnitResult(unit, experts=experts)
    return UnitResult(unit)


def run(s: Scheduler, workers: int = 1, now: float = 0.0, until=None, max_iters: int = 1000) -> list[WorkUnit]:
    """Schedule and complete units (each worker finishes its unit within the iteration) until idle."""
    units: list[WorkUnit] = []
    for _ in range(max_iters):
        out = s.schedule(list(range(workers)), now)
        if not out.units and not s.requests:
            break
        units += out.units
        s.update_from_output([report(u, s) for u in out.units])
        now += 1.0
        if until is not None and until(units):
            break
    return units


def test_scheduler_request_and_batch_key_import_no_torch():
    code = (
        "import sys, serve.engine.scheduler, serve.engine.request, serve.engine.batch_key, serve.engine.cost_model;"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_requests_are_served_first_come_first_served():
    s = Scheduler(SchedulerConfig(max_running_per_worker=1), 1, tokens)
    rs = [add(s, params(seed=i), at=i) for i in range(4)]
    units = run(s)
    encode_order = [u.request_ids[0] for u in units if u.kind == "encode"]
    decode_order = [u.request_ids[0] for u in units if u.kind == "decode"]
    assert encode_order == decode_order == [r.request_id for r in rs]
    assert all(r.status == RequestStatus.FINISHED for r in rs)


def test_each_request_runs_every_step_once_in_order_of_its_experts():
    s = Scheduler(SchedulerConfig(), 1, tokens)
    r = add(s, params(steps=5), at=0)
    units = run(s)
    steps = [u.expert for u in units if u.kind == "denoise"]
    assert steps == list(fake_experts(5)) and r.step == 5 and r.status == RequestStatus.FINISHED


def test_no_batch_mixes_keys_or_experts_and_batches_do_form():
    s = Scheduler(SchedulerConfig(max_batch_size=3, max_running_per_worker=12), 1, tokens)
    mix = [params(steps=4), params(steps=6), params(height=32), params(cfg=False)]
    requests = {add(s, mix[i % 4], at=i).request_id: mix[i % 4] for i in range(12)}
    seen_steps = {rid: 0 for rid in requests}
    for unit in run(s):
        if unit.kind != "denoise":
            continue
        keys = {s_key(requests[rid]) for rid in unit.request_ids}
        experts = {fake_experts(requests[rid].num_inference_steps)[seen_steps[rid]] for rid in unit.request_ids}
        assert len(keys) == 1 and experts == {unit.expert}
        assert len(unit.request_ids) <= 3
        for rid in unit.request_ids:
            seen_steps[rid] += 1
    assert max(len(u.request_ids) for u in run_all_units(mix)) == 3  # the cap is reached, not just respected


def s_key(p: GenerationParams):
    return (p.height, p.num_inference_steps, p.uses_cfg)


def run_all_units(mix):
    s = Scheduler(SchedulerConfig(max_batch_size=3, max_running_per_worker=12), 1, tokens)
    for i in range(12):
        add(s, mix[i % 4], at=i)
    return [u for u in run(s) if u.kind == "denoise"]


def test_predicted_cost_caps_the_batch():
    s = Scheduler(SchedulerConfig(max_batch_size=8, max_batch_cost_s=1.0), 1, tokens)
    s.cost = CostModel(overhead_s=0.1, per_token_s=0.0, per_token2_s=0.0)
    one = s.cost.batch_step_s(tokens(64, 64, 9), True, 1)
    s.cost = CostModel(overhead_s=0.1, per_token_s=0.3 / (2 * tokens(64, 64, 9)), per_token2_s=0.0)
    assert one == pytest.approx(0.1)
    for i in range(6):
        add(s, params(), at=i)
    sizes = [len(u.request_ids) for u in run(s) if u.kind == "denoise"]
    # each sample costs 0.3 s (with CFG), the overhead 0.1 s: at most 3 fit under 1.0 s
    assert max(sizes) == 3 and all(0.1 + 0.3 * n <= 1.0 + 1e-9 for n in sizes)


def staggered_two_expert_workload(policy: str) -> Scheduler:
    """Requests arriving one every two steps, so at any time some need the high-noise expert
    and others the low-noise one."""
    s = Scheduler(SchedulerConfig(expert_policy=policy, max_batch_size=1, max_wait_s=1000), 1, tokens)
    now = 0.0
    pending = [params(steps=8, seed=i) for i in range(6)]
    while pending or s.requests:
        if pending and int(now) % 2 == 0:
            add(s, pending.pop(0), at=now)
        out = s.schedule([0], now)
        s.update_from_output([report(u, s) for u in out.units])
        now += 1.0
    return s


def test_min_swap_order_makes_fewer_expert_swaps_than_fcfs():
    fcfs, min_swap = staggered_two_expert_workload("fcfs"), staggered_two_expert_workload("min-swap")
    assert min_swap.swaps < fcfs.swaps
    print(f"expert swaps: fcfs {fcfs.swaps}, min-swap {min_swap.swaps}")


def test_min_swap_still_serves_an_old_request_within_the_wait_bound():
    s = Scheduler(SchedulerConfig(expert_policy="min-swap", max_batch_size=1, max_wait_s=5), 1, tokens)
    old = add(s, params(steps=2), at=0)  # one high step, one low step
    run(s, until=lambda units: old.step == 1)  # old is now waiting for the low-noise expert
    last_served = old.last_scheduled
    now = last_served + 1
    for i in range(20):  # a stream of new requests that keep the high-noise expert busy
        add(s, params(steps=40, seed=i + 1), at=now)
        out = s.schedule([0], now)
        s.update_from_output([report(u, s) for u in out.units])
        if old.step == 2:
            break
        now += 1
    assert old.step == 2 and old.last_scheduled - last_served <= 5 + 1


def test_cancellation_takes_effect_at_the_next_step_boundary_and_frees_the_worker():
    s = Scheduler(SchedulerConfig(), 2, tokens)
    r = add(s, params(steps=4), at=0)
    run(s, workers=2, until=lambda units: r.step == 1)
    out = s.schedule([0, 1], now=10)
    (unit,) = out.units  # its second step is in flight
    assert s.abort(r.request_id)
    assert s.schedule([], now=11).ended == []  # in flight: not yet
    s.update_from_output([report(unit, s)])
    out = s.schedule([0, 1], now=12)
    assert out.ended == [r] and r.status == RequestStatus.CANCELLED
    assert out.free == {r.worker: [r.request_id]} and not out.units


def test_waiting_request_cancelled_leaves_the_queue():
    s = Scheduler(SchedulerConfig(), 1, tokens)
    r = add(s, params(), at=0)
    s.abort(r.request_id)
    out = s.schedule([], now=1)
    assert out.ended == [r] and not s.waiting and out.free == {}


def test_request_past_its_deadline_fails_with_a_reason():
    s = Scheduler(SchedulerConfig(), 1, tokens)
    r = add(s, params(steps=10), at=0)
    r.deadline = 3.0
    run(s, until=lambda units: len(units) >= 3)
    out = s.schedule([0], now=100)
    assert r in out.ended and r.status == RequestStatus.FAILED and "deadline" in r.error


def test_requests_stay_on_their_worker_and_new_ones_go_to_the_least_loaded():
    s = Scheduler(SchedulerConfig(max_batch_size=1), 2, tokens)
    rs = [add(s, params(steps=6, seed=i), at=i) for i in range(4)]
    units = run(s, workers=2)
    for r in rs:
        assert {u.worker for u in units if r.request_id in u.request_ids} == {r.worker}
    assert {r.worker for r in rs} == {0, 1}


def step(s: Scheduler, worker: int, now: float, complete: bool = True) -> WorkUnit:
    (unit,) = s.schedule([worker], now).units
    if complete:
        s.update_from_output([report(unit, s)])
    return unit


def test_worker_death_requeues_what_had_not_started_and_retries_the_mid_way_once():
    s = Scheduler(SchedulerConfig(max_running_per_worker=2, max_batch_size=4), 2, tokens)
    a = add(s, params(height=64), at=0)
    step(s, 0, now=0)  # encode a
    step(s, 0, now=1)  # a's first step
    b = add(s, params(height=32), at=2)  # another batch key: never in a step with a
    assert step(s, 0, now=2).request_ids == (b.request_id,)  # encode b
    assert step(s, 0, now=3, complete=False).request_ids == (a.request_id,)  # a's second step, running
    d = add(s, params(), at=4)  # no room on worker 0: waits
    assert (a.step, b.step, b.worker) == (1, 0, 0)

    assert s.update_from_output([WorkerDied(0, "worker process died")]) == []
    assert list(s.waiting) == [a, b, d]  # the dead worker's requests first, in arrival order
    assert all(r.status == RequestStatus.WAITING and r.worker is None and r.step == 0 for r in (a, b))
    assert (a.retries, b.retries) == (1, 0)  # only the one that was mid-way used its retry

    unit = step(s, 1, now=5, complete=False)
    assert unit.request_ids == (a.request_id,)  # a retried request runs alone, even with room for more
    ended = s.update_from_output([WorkerDied(1, "worker process died")])
    assert ended == [a] and a.status == RequestStatus.FAILED
    assert a.error == "worker process died; it had been retried once from its seed and died again"
    assert list(s.waiting) == [b, d] and b.retries == 0


def test_queue_is_bounded():
    s = Scheduler(SchedulerConfig(max_queue=2), 1, tokens)
    add(s, params(), at=0)
    add(s, params(), at=1)
    with pytest.raises(QueueFullError):
        add(s, params(), at=2)


def test_eta_grows_with_the_work_ahead():
    s = Scheduler(SchedulerConfig(max_running_per_worker=1), 1, tokens)
    s.cost = CostModel(overhead_s=0.5, per_token_s=0.0, per_token2_s=0.0)
    rs = [add(s, params(steps=4, seed=i), at=i) for i in range(3)]
    etas = [s.eta_s(r.request_id) for r in rs]
    assert etas[0] == pytest.approx(2.0) and etas[0] < etas[1] < etas[2]


def test_cost_model_fit_recovers_known_coefficients():
    truth = CostModel(overhead_s=0.02, per_token_s=3e-5, per_token2_s=2e-9)
    samples = [(t, rows, truth.batch_step_s(t, False, rows)) for t in (256, 1024, 4096) for rows in (1, 2)]
    fitted = CostModel.fit(samples)
    for t in (512, 8192):
        assert fitted.batch_step_s(t, True, 3) == pytest.approx(truth.batch_step_s(t, True, 3), rel=1e-6)


def test_a_dead_worker_does_not_look_least_loaded():
    s = Scheduler(SchedulerConfig(max_batch_size=1), 2, tokens)
    busy = add(s, params(steps=20), at=0)
    out = s.schedule([0], now=0)  # worker 1 is down (not offered): busy goes to worker 0
    assert busy.worker == 0
    s.update_from_output([report(u, s) for u in out.units])
    run(s, workers=1, until=lambda units: busy.step >= 1)
    newcomer = add(s, params(), at=5)
    out = s.schedule([0], now=6)  # worker 1 still down; worker 0 is loaded but the only one alive
    assert [u.kind for u in out.units] == ["encode"] and newcomer.worker == 0


# ---- a decode lane (`--vae-overlap`) --------------------------------------------------------------


def two_requests_one_decoding(s: Scheduler) -> tuple[Request, Request, WorkUnit]:
    """`a` (2 steps) and `b` (6 steps) on worker 0 until `a`'s steps are done; then `a`'s decode is
    scheduled (decode comes before a step) and the worker takes it onto its lane."""
    a, b = add(s, params(steps=2), at=0), add(s, params(steps=6, seed=1), at=0)
    now = 0
    while a.status != RequestStatus.DECODING:
        step(s, 0, now=now)
        now += 1
    assert b.step < 4
    decode = step(s, 0, now=now, complete=False)
    assert decode.kind == "decode" and decode.request_ids == (a.request_id,)
    s.update_from_output([MovedToLane(decode)])
    return a, b, decode


def test_a_decode_on_the_lane_frees_its_worker_for_steps_and_ends_with_its_own_result():
    s = Scheduler(SchedulerConfig(), 1, tokens)
    a, b, decode = two_requests_one_decoding(s)
    for now in (10, 11):  # the worker steps b while a decodes; a is never scheduled again
        unit = step(s, 0, now=now)
        assert unit.kind == "denoise" and unit.request_ids == (b.request_id,)
    assert a.status == RequestStatus.DECODING and a.worker == 0
    assert s.update_from_output([UnitResult(decode, elapsed_s=0.5, on_lane=True)]) == [a]
    assert a.status == RequestStatus.FINISHED and a.timings["decode"] == 0.5
    assert step(s, 0, now=12).request_ids == (b.request_id,)  # b's steps go on


def test_a_lane_result_does_not_end_the_unit_in_flight_on_the_main_lane():
    s = Scheduler(SchedulerConfig(), 1, tokens)
    a, b, decode = two_requests_one_decoding(s)
    before = b.step
    running = step(s, 0, now=10, complete=False)  # b's step, in flight when a's decode reports
    s.update_from_output([UnitResult(decode, on_lane=True)])
    assert s.schedule([0], now=11).units == []  # worker 0 is still busy with `running`
    s.update_from_output([report(running, s)])
    assert b.step == before + 1


def test_a_request_cancelled_while_its_decode_is_on_the_lane_ends_when_the_decode_returns():
    s = Scheduler(SchedulerConfig(), 1, tokens)
    a, b, decode = two_requests_one_decoding(s)
    s.abort(a.request_id)
    assert s.schedule([], now=10).ended == []  # its decode is still running
    s.update_from_output([UnitResult(decode, on_lane=True)])
    assert a.status == RequestStatus.FINISHED  # the video was made; cancelling came too late


def test_a_worker_dying_with_a_decode_on_its_lane_retries_that_request_and_forgets_the_lane():
    s = Scheduler(SchedulerConfig(), 1, tokens)
    a, b, decode = two_requests_one_decoding(s)
    assert s.update_from_output([WorkerDied(0, "worker process died")]) == []
    assert set(s.waiting) == {a, b} and (a.retries, b.retries) == (1, 1) and not s.on_lane
    assert all(r.status == RequestStatus.WAITING and r.worker is None and r.step == 0 for r in (a, b))
    assert len(step(s, 0, now=10).request_ids) == 1  # each retried request runs alone
