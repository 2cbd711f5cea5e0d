"""Tile-major order (one tile over all chunks, then the next) against chunk-major and diffusers.

Tile-major runs the same decoder calls on the same inputs with the same caches as chunk-major and
blends with the same `blend_v`/`blend_h` arithmetic (per frame, on time slices of the kept strips), so
the frames must be bit-identical to chunk-major: `torch.equal`, no tolerance. Against diffusers'
`tiled_decode` / untiled decode the chunk-major tolerance applies (ATOL 1e-5, see test_chunked_decode.py).
"""

import numpy as np
import pytest
import torch

from models.wan.vae_decode import ChunkedVaeDecoder, wan_decode_stage
from serve.pipeline.decode import to_uint8
from serve.vae import VaeDecodeConfig
from tests.vae.conftest import latents
from tests.vae.test_chunked_decode import ATOL, reference

TILES = dict(tile_sample_size=32, tile_sample_overlap=8)


def decode(vae, z: torch.Tensor, **kwargs) -> torch.Tensor:
    decoder = ChunkedVaeDecoder(vae, VaeDecodeConfig(**kwargs))
    try:
        return decoder.decode(z)
    finally:
        decoder.close()


@pytest.mark.parametrize("chunk", [1, 2])
def test_tile_major_matches_diffusers_tiled_decode(tiny_vae, chunk):
    z = latents((1, 16, 3, 12, 10))
    expected = reference(tiny_vae, z, tile=(32, 8))
    got = decode(tiny_vae, z, **TILES, chunk_latent_frames=chunk, order="tile-major")
    diff = (got - expected).abs().max().item()
    print(f"tile-major, chunk {chunk}: max abs vs diffusers tiled_decode {diff:.2e}")
    assert got.shape == expected.shape
    assert diff <= ATOL


def test_tile_major_untiled_matches_diffusers_decode(tiny_vae):
    z = latents((1, 16, 4, 8, 6))
    expected = reference(tiny_vae, z)
    got = decode(tiny_vae, z, chunk_latent_frames=2, order="tile-major")
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= ATOL


@pytest.mark.parametrize("chunk, workers", [(1, 1), (2, 1), (3, 2)])
def test_tile_major_is_bit_identical_to_chunk_major(tiny_vae, chunk, workers):
    # 4 x 4 tiles of unequal sizes (the last row and column are cut short), so every blend case occurs.
    z = latents((2, 16, 5, 12, 10), seed=1)
    common = dict(TILES, chunk_latent_frames=chunk, workers=workers, threads_per_worker=1)
    assert torch.equal(decode(tiny_vae, z, **common, order="tile-major"), decode(tiny_vae, z, **common))


def test_tile_major_chunks_have_chunk_major_shapes(tiny_vae):
    z = latents((1, 16, 6, 12, 10))
    shapes = {}
    for order in ("chunk-major", "tile-major"):
        decoder = ChunkedVaeDecoder(tiny_vae, VaeDecodeConfig(**TILES, chunk_latent_frames=2, order=order))
        shapes[order] = [tuple(c.shape) for c in decoder.iter_chunks(z)]
    assert shapes["tile-major"] == shapes["chunk-major"]
    assert [s[2] for s in shapes["tile-major"]] == [1, 8, 8, 4]


def test_decode_stage_in_tile_major_order_gives_the_same_frames(tiny_vae):
    z = latents((1, 16, 3, 12, 10))
    config = dict(TILES, threads_per_worker=1)
    tile_major = wan_decode_stage(tiny_vae, VaeDecodeConfig(**config, order="tile-major"))
    assert torch.equal(tile_major(z), wan_decode_stage(tiny_vae, VaeDecodeConfig(**config))(z))


@pytest.mark.parametrize("order", ["chunk-major", "tile-major"])
def test_uint8_frames_from_the_decoder_equal_rounding_the_float_frames(tiny_vae, order):
    # 2 videos of 33 frames; the uint8 path converts inside the decoder (on the canvas in tile-major order).
    z = latents((2, 16, 9, 6, 8), seed=2)
    stage = wan_decode_stage(tiny_vae, VaeDecodeConfig(tile_sample_size=32, tile_sample_overlap=16, order=order))
    got = np.concatenate(list(stage.iter_uint8(z)), axis=1)
    np.testing.assert_array_equal(got, to_uint8(stage.batch(z)))
    assert got.shape == (2, 33, 48, 64, 3)


def test_config_rejects_unknown_order():
    with pytest.raises(ValueError, match="order must be one of"):
        VaeDecodeConfig(order="row-major")
