"""Chunked, tiled and parallel decode against diffusers' own `AutoencoderKLWan.decode` / `tiled_decode`.

Tolerances (fp32, CPU):
- Temporal chunking is exact math (the causal cache carries every conv's last two input frames across
  the join); what differs is float rounding, because chunked calls run convs on other shapes and we
  route them to oneDNN (decoder.py). Measured max abs about 4e-6 on frames in [-1, 1]; ATOL 1e-5.
- Tiling is exact against diffusers' `tiled_decode` (same grid, same `blend_v`/`blend_h`) up to the
  same rounding: ATOL 1e-5.
- Tiling against the untiled decode is an approximation by design: a pixel near a tile border sees
  zero padding instead of its neighbours, over the decoder's receptive field (well over 100 px; a
  random-weight decoder spreads it with no decay a trained one would have). So no small max-abs bound
  exists; the test prints max abs and PSNR and checks what blending must achieve: more overlap is
  closer to the untiled decode, and linear blending beats butting tiles together.
"""

import math

import pytest
import torch

from models.wan import vae_decode as decoder_module
from models.wan.vae_decode import ChunkedVaeDecoder
from serve.vae import VaeDecodeConfig
from serve.vae.config import chunk_bounds
from serve.vae.tiles import assemble
from tests.vae.conftest import latents

ATOL = 1e-5


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR for signals in [-1, 1] (peak-to-peak 2)."""
    return 10 * math.log10(4 / ((a - b) ** 2).mean().item())


@torch.inference_mode()
def reference(vae, z: torch.Tensor, tile: tuple[int, int] | None = None) -> torch.Tensor:
    if tile is None:
        return vae.decode(z).sample
    size, overlap = tile
    vae.enable_tiling(size, size, size - overlap, size - overlap)
    try:
        return vae.tiled_decode(z).sample
    finally:
        vae.disable_tiling()


def test_chunk_bounds_first_chunk_is_one_latent_frame():
    assert chunk_bounds(6, 2) == [(0, 1), (1, 3), (3, 5), (5, 6)]
    assert chunk_bounds(1, 3) == [(0, 1)]


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_temporal_chunking_matches_untiled_decode(tiny_vae, chunk):
    z = latents((1, 16, 6, 8, 6))
    expected = reference(tiny_vae, z)
    decoder = ChunkedVaeDecoder(tiny_vae, VaeDecodeConfig(chunk_latent_frames=chunk))
    chunks = list(decoder.iter_chunks(z))
    assert [c.shape[2] for c in chunks] == [1] + [4 * (e - s) for s, e in chunk_bounds(6, chunk)[1:]]
    got = torch.cat(chunks, dim=2)
    diff = (got - expected).abs().max().item()
    print(f"chunk {chunk}: max abs {diff:.2e}")
    assert got.shape == expected.shape == (1, 3, 21, 64, 48)
    assert diff <= ATOL


@pytest.mark.parametrize("chunk", [1, 2])
def test_tiling_matches_diffusers_tiled_decode(tiny_vae, chunk):
    z = latents((1, 16, 3, 12, 10))
    expected = reference(tiny_vae, z, tile=(32, 8))
    config = VaeDecodeConfig(tile_sample_size=32, tile_sample_overlap=8, chunk_latent_frames=chunk)
    got = ChunkedVaeDecoder(tiny_vae, config).decode(z)
    assert ChunkedVaeDecoder(tiny_vae, config).grid(12, 10).num_rows == 4  # really tiled: 4 x 4 tiles
    diff = (got - expected).abs().max().item()
    print(f"tiled, chunk {chunk}: max abs vs diffusers tiled_decode {diff:.2e}")
    assert diff <= ATOL


def test_tiling_against_untiled_decode(tiny_vae, monkeypatch):
    z = latents((1, 16, 3, 12, 10))
    untiled = reference(tiny_vae, z)
    scores = {}
    for overlap in (8, 16):
        got = ChunkedVaeDecoder(tiny_vae, VaeDecodeConfig(tile_sample_size=48, tile_sample_overlap=overlap)).decode(z)
        scores[overlap] = psnr(got, untiled)
        print(f"tile 48/{overlap}: max abs {(got - untiled).abs().max().item():.3f}, PSNR {scores[overlap]:.1f} dB")
    no_blend = lambda a, b, extent: b  # noqa: E731 - tiles butted together, the overlap simply overwritten
    monkeypatch.setattr(decoder_module, "assemble", lambda d, g, v, h: assemble(d, g, no_blend, no_blend))
    butted = ChunkedVaeDecoder(tiny_vae, VaeDecodeConfig(tile_sample_size=48, tile_sample_overlap=16)).decode(z)
    print(f"tile 48/16 without blending: PSNR {psnr(butted, untiled):.1f} dB")
    assert scores[16] > scores[8]
    assert scores[16] > psnr(butted, untiled)


def test_two_workers_give_the_same_frames_as_one(tiny_vae):
    z = latents((1, 16, 4, 12, 10))
    outputs = []
    for workers in (1, 2):
        config = VaeDecodeConfig(tile_sample_size=32, tile_sample_overlap=8, workers=workers, threads_per_worker=1)
        decoder = ChunkedVaeDecoder(tiny_vae, config)
        outputs.append(decoder.decode(z))
        decoder.close()
    assert torch.equal(outputs[0], outputs[1])


def test_workers_run_on_their_own_threads(tiny_vae):
    z = latents((1, 16, 2, 12, 10))
    seen: set[str] = set()
    decoder = ChunkedVaeDecoder(tiny_vae, VaeDecodeConfig(tile_sample_size=32, tile_sample_overlap=8, workers=2))
    run_tile = decoder._run_tile

    def recording(worker, job):
        import threading

        seen.add(threading.current_thread().name)
        return run_tile(worker, job)

    decoder._run_tile = recording
    decoder.decode(z)
    decoder.close()
    assert {name.rsplit("_", 1)[0] for name in seen} == {"vae-decode-0", "vae-decode-1"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(tile_sample_size=0), "tile_sample_size"),
        (dict(tile_sample_size=64, tile_sample_overlap=64), "tile_sample_overlap"),
        (dict(chunk_latent_frames=0), "chunk_latent_frames"),
        (dict(workers=0), "workers"),
        (dict(threads_per_worker=0), "threads_per_worker"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VaeDecodeConfig(**kwargs)


def test_tile_not_a_multiple_of_compression_is_rejected(tiny_vae):
    decoder = ChunkedVaeDecoder(tiny_vae, VaeDecodeConfig(tile_sample_size=36, tile_sample_overlap=8))
    with pytest.raises(ValueError, match="multiples of the VAE's spatial compression"):
        decoder.grid(12, 10)
