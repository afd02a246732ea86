"""Student training windows: every pixel, border pixels included, is trained on equally often."""
import numpy as np

from ustudents.train.students import crop_window


def coverage(size: int, crop: int, draws: int = 20000) -> np.ndarray:
    gen = np.random.default_rng(0)
    hits = np.zeros(size)
    for _ in range(draws):
        start, trained = crop_window(gen, size, crop)
        assert 0 <= start <= size - crop  # the computed window lies inside the image (targets exist there)
        assert 0 <= trained.start < trained.stop <= crop
        hits[start + trained.start:start + trained.stop] += 1
    return hits / draws


def test_border_pixels_are_trained_on_as_often_as_central_ones():
    cov = coverage(size=128, crop=32)
    # Each pixel lies in `crop` of the size + crop - 1 equally likely drawn windows. Uniform starts
    # in [0, size - crop] instead would give the outermost pixel 1/97 against the centre's 32/97.
    expected = 32 / (128 + 32 - 1)
    assert np.abs(cov - expected).max() < 0.02
    assert cov[0] > 0.9 * expected and cov[-1] > 0.9 * expected


def test_a_window_as_large_as_the_image_is_the_whole_image():
    gen = np.random.default_rng(0)
    for _ in range(20):
        start, trained = crop_window(gen, 64, 64)
        assert (start, trained) == (0, slice(0, 64))
