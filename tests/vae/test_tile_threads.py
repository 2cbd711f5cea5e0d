"""Tiles decode with one intra-op thread each on a CPU by default (small ops lose more at OpenMP
barriers than a second thread gains); the frames are those of an explicit one-thread config."""

import threading

import torch

from models.wan.vae_decode import ChunkedVaeDecoder
from serve.vae import VaeDecodeConfig
from tests.vae.conftest import latents

TILES = dict(tile_sample_size=32, tile_sample_overlap=8, order="tile-major")


def test_tiles_run_single_threaded_off_the_caller_and_untiled_decode_stays_inline(tiny_vae):
    seen: list[tuple[str, int]] = []
    z = latents((1, 16, 2, 6, 8))
    for config in (VaeDecodeConfig(**TILES), VaeDecodeConfig()):
        decoder = ChunkedVaeDecoder(tiny_vae, config)
        run_tile = decoder._run_tile

        def recording(worker, job, run_tile=run_tile):
            seen.append((threading.current_thread().name, torch.get_num_threads()))
            return run_tile(worker, job)

        decoder._run_tile = recording
        decoder.decode(z)
        decoder.close()
    tiled = [s for s in seen if s[0].startswith("vae-decode")]
    assert tiled and all(threads == 1 for _, threads in tiled)
    caller = threading.current_thread().name
    assert (caller, torch.get_num_threads()) in seen  # the untiled decode ran inline, at the caller's count


def test_default_tiled_frames_equal_an_explicit_single_thread_config(tiny_vae):
    z = latents((1, 16, 3, 6, 8))
    default = ChunkedVaeDecoder(tiny_vae, VaeDecodeConfig(**TILES))
    explicit = ChunkedVaeDecoder(tiny_vae, VaeDecodeConfig(**TILES, threads_per_worker=1))
    assert torch.equal(default.decode(z), explicit.decode(z))
