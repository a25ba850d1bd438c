"""`vision.figures.heat_overlay`: the hottest cell of the drawn heat-map is the patch with the largest code, also
on a red photo (where a red overlay over the colour image used to vanish: docs/vision.md, the coffee example)."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from featurekit.vision.figures import FRAME, heat_overlay


def redness(picture: Image.Image, g: int) -> np.ndarray:
    """(g, g): each patch cell's mean of R − (G + B) / 2."""
    a = np.asarray(picture.convert("RGB"), dtype=np.float64)
    red = a[..., 0] - (a[..., 1] + a[..., 2]) / 2
    size = a.shape[0]
    return red.reshape(g, size // g, g, size // g).mean(axis=(1, 3))


@settings(max_examples=25, deadline=None)
@given(g=st.integers(2, 16), seed=st.integers(0, 2**16), colour=st.sampled_from([(200, 30, 10), (128, 128, 128), (0, 0, 0)]))
def test_hottest_cell_is_the_largest_code(g, seed, colour):
    rng = np.random.default_rng(seed)
    codes = np.where(rng.random((g, g)) < 0.3, rng.random((g, g)), 0.0).astype(np.float32)
    r, c = divmod(int(rng.integers(g * g)), g)
    codes[r, c] = codes.max() + 0.5  # one clear maximum
    size = 14 * g
    picture = heat_overlay(Image.new("RGB", (40, 30), colour), codes, size)
    assert picture.size == (size, size)
    assert np.unravel_index(redness(picture, g).argmax(), (g, g)) == (r, c)
    a = np.asarray(picture)
    assert tuple(a[r * 14, c * 14]) == FRAME  # the frame's corner is on that patch
    cold = np.asarray(codes) <= 0
    cells = a.reshape(g, 14, g, 14, 3).transpose(0, 2, 1, 3, 4)[cold]
    assert (cells[..., 0] == cells[..., 1]).all() and (cells[..., 1] == cells[..., 2]).all()  # no code: grey, even on red


def test_no_firing_draws_no_heat_and_no_frame():
    picture = heat_overlay(Image.new("RGB", (32, 32), (200, 30, 10)), np.zeros((4, 4), np.float32), 32)
    a = np.asarray(picture)
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
