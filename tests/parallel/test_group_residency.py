"""Quantized storage and block offload per rank (issue 14): a worker group of 2 ranks (Ulysses 2)
and one process, both loading int8 weight-only blocks that stream through one block at a time
(`--weights-dtype int8 --memory-mode block-offload`), give the same video for the same request.

Every rank holds the whole model, so each quantizes and offloads its own copy; the runner is the
production one, wrapped only to note, from a hook on every expert's first block, what that rank's
weights looked like while it ran: int8 storage, and blocks off the device. The test can then not
pass with the options ignored on one rank.

Tolerance: bit-identical, as Ulysses alone (tests/parallel/test_ulysses.py): offload moves the
int8 weights unchanged (tests/memory/test_residency.py) and Ulysses slices the sequence exactly.
Measured max |diff| 0 on uint8 frames.
"""

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest

from serve.loader.config import MemoryConfig
from serve.pipeline.mp4 import decode_mp4
from serve.worker.factory import RunnerConfig, load_model_runner
from tests.parallel.conftest import TIMEOUT_S, group_core, request

OPTIONS = RunnerConfig(memory=MemoryConfig(mode="block-offload", weights_dtype="int8", prefetch_blocks=0))
PLAN = "block-offload, text encoder device, prefetch 0 blocks"  # what each worker's Ready reports
NOTES_ENV = "REELSERVE_TEST_RESIDENCY_NOTES"  # the directory each process writes its notes to


def noting_runner(model_dir, device, dtype, options):
    """The production runner; the first forward of each expert's first block writes one line to
    `<notes>/<rank0|rank1|single>`: the residency mode, the storage dtype of that block's query
    projection, and how many of the expert's blocks were off the device (meta) at that moment."""
    import torch.distributed as dist

    runner = load_model_runner(model_dir, device, dtype, options)
    name = f"rank{dist.get_rank()}" if dist.is_initialized() else "single"
    path = Path(os.environ[NOTES_ENV]) / name
    mode = runner.residency.config.mode if runner.residency is not None else "resident"
    noted: set[int] = set()

    def note(index, blocks):
        def hook(module, args):  # registered after the residency's hooks: this block is loaded
            if index not in noted:
                noted.add(index)
                off = sum(block.attn1.to_q.weight.is_meta for block in blocks)
                with open(path, "a") as f:
                    f.write(f"{mode} {module.attn1.to_q.weight.dtype} {off}/{len(blocks)}\n")

        return hook

    for index, expert in enumerate(runner.denoise.experts):
        expert.blocks[0].register_forward_pre_hook(note(index, expert.blocks))
    return runner


@pytest.fixture(scope="module")
def notes(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("notes")


@pytest.fixture(scope="module")
def core(tiny_model_dir, outputs_dir, notes):
    """Worker 0: a group of two ranks (Ulysses 2); worker 1: one process; one request each at a time."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(NOTES_ENV, str(notes))  # the spawned processes inherit it
        engine = group_core(
            str(tiny_model_dir),
            [(2, 1), None],
            outputs_dir,
            options=OPTIONS,
            max_running_per_worker=1,
            max_batch_size=1,
        )
        for w in engine.executor.workers:
            w.args = dataclasses.replace(w.args, runner_factory=f"{__name__}:noting_runner")
        engine.start()
        yield engine
        engine.stop()


def test_int8_block_offload_on_each_rank_matches_one_process(core, notes):
    assert [w.info.memory_plan for w in core.executor.workers] == [PLAN, PLAN]  # the group's is rank 0's
    p = request(seed=7, steps=4)
    futures = [core.add_request(p)[1] for _ in range(2)]  # one per worker: each holds one at a time
    results = [f.result(TIMEOUT_S) for f in futures]
    assert sorted({w for _, w, _ in r.trace} for r in results) == [{0}, {1}]  # one on the group, one alone
    group, single = (decode_mp4(r.mp4)[0].astype(int) for r in sorted(results, key=lambda r: r.trace[0][1]))
    assert np.abs(group - single).max() == 0
    for name in ("rank0", "rank1", "single"):
        lines = (notes / name).read_text().splitlines()
        assert len(lines) == 2, (name, lines)  # both experts ran on every rank
        for line in lines:
            mode, storage, off = line.split()
            blocks_off, blocks = map(int, off.split("/"))
            assert (mode, storage) == ("block-offload", "torch.int8"), (name, line)
            assert 0 < blocks_off < blocks, (name, line)  # a window of blocks, not all of them
