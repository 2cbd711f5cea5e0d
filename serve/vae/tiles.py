"""Spatial tiles of a latent frame and their blended assembly, in diffusers' `tiled_decode` geometry.

The grid and the blend are diffusers' own (same tile origins, `blend_v`/`blend_h` called on the VAE),
so a tiled decode here equals `AutoencoderKLWan.tiled_decode`; what is new is that tiles are decoded
per temporal chunk (each with its own causal cache) and assembled chunk by chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from serve.vae.config import VaeDecodeConfig

Blend = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
Finish = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Tile:
    """A [y0, y1) x [x0, x1) window of the latent, in latent pixels."""

    y0: int
    y1: int
    x0: int
    x1: int

    def crop(self, z: torch.Tensor) -> torch.Tensor:
        return z[:, :, :, self.y0 : self.y1, self.x0 : self.x1]


@dataclass(frozen=True)
class TileGrid:
    """Row-major tiles plus what assembly needs, all in decoder-output pixels (before unpatchify)."""

    tiles: tuple[Tile, ...]
    num_cols: int
    stride: int
    blend: int
    out_height: int
    out_width: int

    @property
    def num_rows(self) -> int:
        return len(self.tiles) // self.num_cols


def plan_tiles(
    latent_height: int, latent_width: int, config: VaeDecodeConfig, spatial_ratio: int, patch: int
) -> TileGrid:
    """Tiles for one latent frame. `spatial_ratio` is the VAE's pixels per latent pixel, `patch` its
    output patch size (1 for Wan2.1; 2 for the Wan2.2 TI2V VAE, whose decoder emits patched pixels)."""
    per_latent = spatial_ratio // patch
    out_h, out_w = latent_height * per_latent, latent_width * per_latent
    size = config.tile_sample_size
    if size is None or (latent_height <= size // spatial_ratio and latent_width <= size // spatial_ratio):
        whole = Tile(0, latent_height, 0, latent_width)
        return TileGrid((whole,), num_cols=1, stride=max(out_h, out_w), blend=0, out_height=out_h, out_width=out_w)
    stride = size - config.tile_sample_overlap
    _check_divisible(size, stride, spatial_ratio)
    lat_size, lat_stride = size // spatial_ratio, stride // spatial_ratio
    ys, xs = range(0, latent_height, lat_stride), range(0, latent_width, lat_stride)
    tiles = tuple(Tile(y, min(y + lat_size, latent_height), x, min(x + lat_size, latent_width)) for y in ys for x in xs)
    return TileGrid(tiles, len(xs), stride // patch, (size - stride) // patch, out_h, out_w)


def _check_divisible(size: int, stride: int, spatial_ratio: int) -> None:
    if size % spatial_ratio or stride % spatial_ratio:
        raise ValueError(
            f"tile_sample_size ({size}) and tile stride ({stride} = size - overlap) must be multiples of the "
            f"VAE's spatial compression ({spatial_ratio}); round them to the nearest multiple"
        )


def assemble(decoded: Sequence[torch.Tensor], grid: TileGrid, blend_v: Blend, blend_h: Blend) -> torch.Tensor:
    """Blend decoded tiles (row-major, each (B, C, F, h, w)) into (B, C, F, H, W).

    Mirrors diffusers' `tiled_decode` loop exactly, including its in-place blending order (a tile is
    blended into by the tile above and the one to its left after they were themselves blended)."""
    if len(decoded) == 1:
        return decoded[0]
    cols = grid.num_cols
    rows = [list(decoded[r * cols : (r + 1) * cols]) for r in range(grid.num_rows)]
    out_rows = []
    for i, row in enumerate(rows):
        out_row = []
        for j, tile in enumerate(row):
            if i > 0:
                tile = blend_v(rows[i - 1][j], tile, grid.blend)
            if j > 0:
                tile = blend_h(row[j - 1], tile, grid.blend)
            out_row.append(tile[:, :, :, : grid.stride, : grid.stride])
        out_rows.append(torch.cat(out_row, dim=-1))
    return torch.cat(out_rows, dim=3)[:, :, :, : grid.out_height, : grid.out_width]


class BlendedCanvas:
    """Tiles that arrive in row-major order, each as temporal pieces, blended into one (B, C, F, H, W)
    tensor with `assemble`'s arithmetic (same `blend_v`/`blend_h`, same order).

    `assemble` needs a whole row of tiles plus the row above. A tile only ever reads the bottom `blend`
    rows of the tile above and the right `blend` columns of the tile to its left, both after their own
    blending, so only those strips (over all frames) are kept. The blends are per frame, so blending a
    tile piece by piece against time slices of the strips gives the same numbers. The square a tile
    owns is final once written, so `finish` (e.g. clamping, or conversion to uint8) can be applied to it
    then, and `out` takes finish's dtype."""

    def __init__(
        self,
        grid: TileGrid,
        frames: int,
        blend_v: Blend,
        blend_h: Blend,
        finish: Finish,
    ) -> None:
        self.grid, self.frames, self.finish = grid, frames, finish
        self.out: torch.Tensor | None = None  # allocated at the first piece (its batch, channels and dtype)
        self._blend_v, self._blend_h = blend_v, blend_h
        self._bottom: dict[int, torch.Tensor] = {}  # tile index -> its blended last `blend` rows, all frames
        self._right: dict[int, torch.Tensor] = {}  # tile index -> its blended last `blend` columns, all frames

    def add(self, index: int, t0: int, piece: torch.Tensor) -> None:
        """Blend frames [t0, t0 + f) of tile `index`, a (B, C, f, h, w) piece; tiles left of and above
        it must have added these frames already."""
        row, col = divmod(index, self.grid.num_cols)
        t1, extent = t0 + piece.shape[2], self.grid.blend
        if row:
            piece = self._blend_v(self._bottom[index - self.grid.num_cols][:, :, t0:t1], piece, extent)
        if col:
            piece = self._blend_h(self._right[index - 1][:, :, t0:t1], piece, extent)
        if extent:
            bottom, right = piece[:, :, :, -extent:, :], piece[:, :, :, :, -extent:]
            self._strip(self._bottom, index, bottom)[:, :, t0:t1] = bottom
            self._strip(self._right, index, right)[:, :, t0:t1] = right
        self._write(row, col, t0, piece)

    def finish_tile(self, index: int) -> None:
        """Drop the strips only tile `index` read: a strip has one reader, the tile below or to the right."""
        self._bottom.pop(index - self.grid.num_cols, None)
        self._right.pop(index - 1, None)

    def _strip(self, strips: dict[int, torch.Tensor], index: int, piece: torch.Tensor) -> torch.Tensor:
        if index not in strips:
            shape = (*piece.shape[:2], self.frames, *piece.shape[3:])
            strips[index] = torch.empty(shape, dtype=piece.dtype, device=piece.device)
        return strips[index]

    def _write(self, row: int, col: int, t0: int, piece: torch.Tensor) -> None:
        """Only the tile's [0, stride) square is its own (the rest was blended into later tiles), as in `assemble`."""
        y0, x0, s = row * self.grid.stride, col * self.grid.stride, self.grid.stride
        own = self.finish(piece[:, :, :, : min(s, self.grid.out_height - y0), : min(s, self.grid.out_width - x0)])
        if self.out is None:
            shape = (*own.shape[:2], self.frames, self.grid.out_height, self.grid.out_width)
            self.out = torch.empty(shape, dtype=own.dtype, device=own.device)
        self.out[:, :, t0 : t0 + own.shape[2], y0 : y0 + own.shape[3], x0 : x0 + own.shape[4]] = own
