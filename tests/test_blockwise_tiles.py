"""The block search's tiling is a matter of speed only: every block is searched alone, so tiles of any width give
the same codes, scales and zero points (rows of blocks taken whole, cut in equal tiles, or strided)."""

import numpy as np
import pytest

from ptqlite import blockwise
from ptqlite.blockwise import float16_grid, quantize_blocks


@pytest.mark.parametrize(("shape", "bits", "axis", "block"), [
    ((96, 300), 4, 0, 32), ((300, 96), 4, 0, 16), ((40, 200), 6, 1, 64), ((77, 130), 8, 0, 32)])
def test_tiling_changes_no_code(monkeypatch, shape, bits, axis, block):
    rng = np.random.default_rng(7)
    w = rng.standard_t(4, shape).astype(np.float32)
    w[:block, :5] = 0  # blocks with no non-zero code keep their scale
    results = []
    for chunk in (1 << 17, 1024, 200):  # whole rows; equal tiles of a few columns; tiles narrower than a row
        monkeypatch.setattr(blockwise, "_CHUNK", chunk)
        results.append(quantize_blocks(w, bits, axis, block, scale_grid=float16_grid))
    first = results[0]
    for other in results[1:]:
        assert np.array_equal(other.codes, first.codes)
        assert np.array_equal(other.scale, first.scale)
        assert np.array_equal(other.zero_point, first.zero_point)
        # einsum may add a block's float32 products in another order for another tile shape: last bits only
        assert other.squared_error == pytest.approx(first.squared_error, rel=1e-6)
    # and the search is as good as round to nearest, block by block, at every tiling
    rtn = quantize_blocks(w, bits, axis, block, search=False, scale_grid=float16_grid)
    assert first.squared_error <= rtn.squared_error


def test_tile_width_covers_the_row():
    for after, block in [(1, 32), (2048, 32), (5632, 32), (8192, 32), (8193, 32), (32000, 32), (32000, 64)]:
        width = blockwise._tile_width(after, block)
        assert 1 <= width <= after
        if after * block <= 2 * blockwise._CHUNK:
            assert width == after
        else:
            assert width * block <= blockwise._CHUNK
            tiles = -(-after // width)
            assert tiles * width - after < width  # equal tiles, the last one not a narrow remainder
