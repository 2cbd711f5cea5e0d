"""The worker process: owns the model and the latents of the requests it holds; answers a few verbs.

Protocol (tuples, so they pickle cheaply and need no shared class versions):

    parent -> worker   ("encode", unit_id, [(request_id, GenerationParams), ...])
                       ("denoise", unit_id, [request_id, ...], expert)
                       ("decode", unit_id, [request_id, ...])
                       ("free", [request_id, ...])
                       ("shutdown",)
    worker -> parent   ("ready", info) | ("load_failed", reason)
                       ("result", unit_id, UnitReport)

Latents never leave this process; a decode returns the finished MP4's bytes. Nothing here imports
torch at module level: the API process imports this module to name the spawn target.
"""

from __future__ import annotations

import importlib
import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from serve.engine.request import GenerationParams
from serve.pipeline.mp4 import encode_mp4

log = logging.getLogger(__name__)

DEFAULT_RUNNER_FACTORY = "serve.worker.worker:load_model_runner"


@dataclass(frozen=True)
class RunnerOptions:
    """How the worker builds its runner, as plain data (it is pickled into the spawned process and
    built into torch objects there, so the API process never imports torch)."""

    quant: str | None = None
    """Per-expert quantization policy, e.g. `high=w8a8-int8,low=none` (None: float weights)."""
    quant_skip: tuple[str, ...] = ()
    """Extra regexes of layers to keep in float."""
    lora_dirs: tuple[str, ...] = ()
    """Directories LoRA files may come from."""
    fused_loras: tuple[tuple[str, int, float], ...] = ()
    """(file, expert index, scale) fused into the weights at load."""
    per_request_loras: bool = False
    """Whether requests may name LoRAs from `lora_dirs`."""
    step_cache_threshold: float | None = None
    """First-block step cache threshold for every request (None: off)."""
    vae_tile: int | None = None
    """VAE decode tile size in output pixels (None: untiled)."""
    vae_tile_overlap: int = 64
    vae_chunk_frames: int = 1
    """Latent frames per temporal decode chunk."""
    vae_workers: int = 1
    """Threads (or devices) that decode tiles in parallel."""
    vae_order: str = "chunk-major"
    """chunk-major streams chunks into the MP4; tile-major holds one tile's cache at a time (least memory)."""
    memory_mode: str = "auto"
    """auto (the planner picks for this worker's device), resident, expert-swap or block-offload."""
    weights_dtype: str = "bf16"
    """Weight storage the planner assumes: bf16, fp8 or int8 (fp8/int8 imply weight-only quantization)."""
    text_encoder_device: str = "auto"
    prefetch_blocks: int = 1
    vram: str | None = None
    """Device budget, e.g. 24GiB (None: measured free memory of this worker's device)."""
    ram: str | None = None
    largest_request: tuple[int, int, int] = (1280, 1280, 129)
    """(height, width, frames) of the largest request the server accepts: what must fit."""


@dataclass(frozen=True)
class WorkerArgs:
    """What a worker needs to build its runner; pickled into the spawned process."""

    model_dir: str
    device: str = "cpu"
    dtype: str = "float32"
    runner_factory: str = DEFAULT_RUNNER_FACTORY
    """`module:function` called as f(model_dir, device, dtype, options) -> runner; tests name a fake."""
    options: RunnerOptions = RunnerOptions()
    calibrate: bool = True
    """Time a few forwards after loading, for the scheduler's cost model (and as warmup)."""
    torch_threads: int = 0
    """CPU threads for torch in this worker (0: torch's default). Several CPU workers on one
    machine must split the cores, or each spawns a thread per core and they thrash."""


@dataclass
class UnitReport:
    """The outcome of one unit: per-request failures, and what the scheduler or client needs."""

    failed: dict[str, str] = field(default_factory=dict)
    experts: dict[str, tuple[int, ...]] = field(default_factory=dict)
    mp4: dict[str, bytes] = field(default_factory=dict)
    mp4_s: float = 0.0
    elapsed_s: float = 0.0
    counters: dict[str, int] = field(default_factory=dict)  # e.g. step-cache skips of the decoded requests


def load_model_runner(model_dir: str, device: str, dtype: str, options: RunnerOptions = RunnerOptions()) -> Any:
    """The production factory: the real ModelRunner, torch imported only here."""
    import torch

    from models.wan.spec import read_spec
    from serve.lora.options import FusedLora, LoraOptions
    from serve.quant.schemes import QuantPolicy
    from serve.vae import VaeDecodeConfig
    from serve.worker.model_runner import ModelRunner

    quant_text = options.quant or WEIGHTS_DTYPE_QUANT[options.weights_dtype]
    quant = None
    if quant_text:
        quant = QuantPolicy.parse(quant_text, read_spec(model_dir).expert_names, options.quant_skip)
    fused_dirs = tuple(dict.fromkeys(Path(f).resolve().parent for f, _, _ in options.fused_loras))
    lora = LoraOptions(
        # The operator's own command line is trusted: files fused at load may sit outside
        # --lora-dir; per-request LoRAs never do (per_request is set only with --lora-dir).
        lora_dirs=tuple(Path(d) for d in options.lora_dirs) or fused_dirs,
        fused=tuple(FusedLora(Path(f), expert, scale) for f, expert, scale in options.fused_loras),
        per_request=options.per_request_loras,
    )
    return ModelRunner.from_checkpoint(
        model_dir,
        device=device,
        dtype=getattr(torch, dtype),
        quant=quant,
        lora=lora,
        step_cache_threshold=options.step_cache_threshold,
        residency=plan_residency(model_dir, device, options),
        vae_decode=VaeDecodeConfig(
            tile_sample_size=options.vae_tile,
            tile_sample_overlap=options.vae_tile_overlap,
            chunk_latent_frames=options.vae_chunk_frames,
            workers=options.vae_workers,
            order=options.vae_order,
        ),
    )


# `--weights-dtype` names a storage; the quantization that gives it (weight-only, upcast per layer).
WEIGHTS_DTYPE_QUANT = {"bf16": None, "fp8": "fp8-wo", "int8": "int8-wo"}


def plan_residency(model_dir: str, device: str, options: RunnerOptions) -> Any:
    """The memory mode for this worker's device: forced by `memory_mode`, or chosen by the planner
    from this device's free memory (each GPU of a multi-GPU host is measured on its own).
    None keeps everything resident, which is what `auto` means on a CPU: there is no separate
    device memory to save."""
    from models.inspect import model_stats
    from serve.loader.planner import choose, measure_budget
    from serve.loader.residency import ResidencyConfig

    if options.memory_mode == "resident" or (options.memory_mode == "auto" and device == "cpu"):
        return None
    if options.memory_mode != "auto":
        text = "device" if options.text_encoder_device == "auto" else options.text_encoder_device
        return ResidencyConfig(options.memory_mode, options.prefetch_blocks, text)
    budget = measure_budget(options.vram, options.ram, device=device)
    plan = choose(
        model_stats(model_dir),
        budget,
        options.largest_request,
        options.weights_dtype,
        options.prefetch_blocks,
        "auto",
        options.text_encoder_device,
    )
    return plan.config(options.prefetch_blocks)


def import_object(path: str) -> Any:
    module_name, _, attr = path.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def check_frames(frames: Any, params: GenerationParams) -> None:
    """A runner bug must fail its request, not reach the client as a wrong-sized video."""
    expected = (params.num_frames, params.height, params.width, 3)
    if tuple(frames.shape) != expected or str(frames.dtype) != "uint8":
        raise RuntimeError(f"runner returned {frames.dtype} frames {tuple(frames.shape)}, expected uint8 {expected}")


def step_cache_counts(states: list[Any]) -> dict[str, int]:
    """Steps the first-block cache skipped and computed, summed over finished requests."""
    caches = [c for c in (getattr(s, "step_cache", None) for s in states) if c is not None]
    if not caches:
        return {}
    return {"skipped": sum(c.skipped for c in caches), "computed": sum(c.computed for c in caches)}


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


class Worker:
    def __init__(self, conn: Connection, args: WorkerArgs) -> None:
        self.conn = conn
        self.args = args
        self.runner: Any = None
        self.states: dict[str, Any] = {}  # request_id -> the runner's per-request state
        self.running = True

    def load(self) -> bool:
        try:
            factory = import_object(self.args.runner_factory)
            self.runner = factory(self.args.model_dir, self.args.device, self.args.dtype, self.args.options)
            samples = self._calibrate() if self.args.calibrate else []
        except Exception as e:  # any load error must reach the parent as a message, not a silent exit
            log.error("worker failed to load the model:\n%s", traceback.format_exc())
            self.conn.send(("load_failed", _reason(e)))
            return False
        self.conn.send(("ready", {"device": self.args.device, "dtype": self.args.dtype, "cost_samples": samples}))
        return True

    def _calibrate(self) -> list[tuple[int, int, float]]:
        calibrate = getattr(self.runner, "calibrate", None)
        return calibrate() if calibrate is not None else []

    # ---- verbs ----------------------------------------------------------------------------------

    def encode(self, items: list[tuple[str, GenerationParams]]) -> UnitReport:
        report = UnitReport()
        try:
            states = self.runner.start([params for _, params in items])
        except Exception as e:  # the batch's text encode failed: every request in it fails
            log.error("encode failed:\n%s", traceback.format_exc())
            report.failed = {rid: _reason(e) for rid, _ in items}
            return report
        for (rid, _), state in zip(items, states, strict=True):
            self.states[rid] = state
            report.experts[rid] = tuple(self.runner.experts_of(state))
        return report

    def denoise(self, request_ids: list[str], expert: int) -> UnitReport:
        report = UnitReport()
        try:
            self.runner.denoise_step([self.states[rid] for rid in request_ids], expert)
        except Exception as e:  # the batch shared one forward pass: all its requests fail
            log.error("denoise step failed:\n%s", traceback.format_exc())
            report.failed = {rid: _reason(e) for rid in request_ids}
            self.free(request_ids)
        return report

    def decode(self, request_ids: list[str]) -> UnitReport:
        """Decode requests of one shape together and return their MP4s (only bytes leave)."""
        report = UnitReport()
        states = [self.states.pop(rid) for rid in request_ids]
        report.counters = step_cache_counts(states)
        try:
            if hasattr(self.runner, "finish_mp4"):  # streams chunks into the encoders
                videos, timings = self.runner.finish_mp4(states)
                report.mp4, report.mp4_s = dict(zip(request_ids, videos, strict=True)), timings["mp4"]
            else:
                self._finish_then_encode(request_ids, states, report)
        except Exception as e:
            log.error("decode failed:\n%s", traceback.format_exc())
            report.failed = {rid: _reason(e) for rid in request_ids}
        return report

    def _finish_then_encode(self, request_ids: list[str], states: list[Any], report: UnitReport) -> None:
        """For runners that return whole uint8 videos: check each, then encode it."""
        for rid, state in zip(request_ids, states, strict=True):
            frames = self.runner.finish(state)
            check_frames(frames, state.params)
            start = time.perf_counter()
            report.mp4[rid] = encode_mp4(frames, state.params.fps, state.params.lossless)
            report.mp4_s += time.perf_counter() - start

    def free(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.states.pop(rid, None)

    def shutdown(self) -> None:
        self.running = False

    def serve(self) -> None:
        units: dict[str, Callable[..., UnitReport]] = {
            "encode": self.encode,
            "denoise": self.denoise,
            "decode": self.decode,
        }
        while self.running:
            try:
                verb, *args = self.conn.recv()
            except (EOFError, OSError):  # the parent is gone: nobody is left to answer
                return
            if verb == "free":
                self.free(*args)
            elif verb == "shutdown":
                self.shutdown()
            else:
                unit_id, *unit_args = args
                start = time.perf_counter()
                report = units[verb](*unit_args)
                report.elapsed_s = time.perf_counter() - start
                self.conn.send(("result", unit_id, report))


def worker_main(conn: Connection, args: WorkerArgs) -> None:
    """Entry point of the spawned process."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(message)s")
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    worker = Worker(conn, args)
    if worker.load():
        worker.serve()
    conn.close()
