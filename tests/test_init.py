"""Tests for fastnn.init: the patch-whitening filters (airbench's init_whitening_conv)."""
import numpy as np
import pytest

from fastnn import init
from fastnn.init import patch_covariance, whitening_filters


def _images(seed=0, n=6, c=3, h=7, w=6):
    """Correlated channels and neighbouring pixels, as images have."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h + 1, w + 1))
    x = x[:, :, 1:, 1:] + 0.7 * x[:, :, :-1, :-1]  # neighbours correlate
    return (x + 0.5 * x.mean(axis=1, keepdims=True)).astype(np.float32)


def _patches_as_airbench(x, k):
    """Every k x k patch as a row, in airbench's get_patches order (x.unfold(2, k, 1)
    .unfold(3, k, 1).transpose(1, 3).reshape(-1, c, k, k)), by explicit loops."""
    n, c, h, w = x.shape
    rows = [x[i, :, r:r + k, s:s + k].reshape(-1)
            for i in range(n) for s in range(w - k + 1) for r in range(h - k + 1)]
    return np.array(rows, dtype=np.float64)


@pytest.mark.parametrize("k", [2, 3])
def test_whitening_filters_are_airbench_s(k):
    """Eigenvectors of patches.T @ patches / n in descending eigenvalue order, each over
    sqrt(eigenvalue + eps), then their negatives (signs are LAPACK's, compared up to sign)."""
    x, eps = _images(), 5e-4
    patches = _patches_as_airbench(x, k)
    covariance = patches.T @ patches / len(patches)
    np.testing.assert_allclose(patch_covariance(x, k), covariance, rtol=1e-12, atol=1e-12)
    values, vectors = np.linalg.eigh(covariance, UPLO="U")
    expected = (vectors.T / np.sqrt(values + eps)[:, None])[::-1].reshape(-1, 3, k, k)
    filters = whitening_filters(x, kernel_size=k, eps=eps)
    d = 3 * k * k
    assert filters.shape == (2 * d, 3, k, k) and filters.dtype == np.float64
    np.testing.assert_array_equal(filters[d:], -filters[:d])
    signs = np.sign((filters[:d] * expected).sum(axis=(1, 2, 3)))
    np.testing.assert_allclose(filters[:d] * signs[:, None, None, None], expected, rtol=1e-7,
                               atol=1e-9)


def test_whitened_patches_have_identity_covariance():
    """The first half of the filters maps patches to coordinates of covariance
    diag(lambda / (lambda + eps)): the identity as eps -> 0."""
    x = _images(1, n=20)
    patches = _patches_as_airbench(x, 2)
    for eps, tol in [(1e-10, 1e-7), (5e-4, None)]:
        filters = whitening_filters(x, 2, eps)[:12].reshape(12, -1)
        white = patches @ filters.T
        covariance = white.T @ white / len(white)
        if tol:
            np.testing.assert_allclose(covariance, np.eye(12), atol=tol)
        else:
            values = np.linalg.eigvalsh(patch_covariance(x, 2))[::-1]
            np.testing.assert_allclose(covariance, np.diag(values / (values + eps)), atol=1e-9)


def test_relative_eps_whitens_alike_at_any_scale():
    """relative=True: eps in units of the patches' mean variance, so images scaled by s
    give the filters of the unscaled images divided by s (same whitened outputs); an
    absolute eps does not (airbench's 5e-4 assumes unit-variance images)."""
    x = _images(3, n=6)
    variance = float(np.mean(np.diag(patch_covariance(x, 2))))
    def up_to_sign(a, b):  # LAPACK's eigenvector signs may differ between the two
        return a * np.sign((a * b).sum(axis=(1, 2, 3)))[:, None, None, None]

    def norms(filters):  # 1 / sqrt(eigenvalue + eps): free of the eigenvectors' round-off
        return np.sqrt((filters ** 2).sum(axis=(1, 2, 3)))

    expected = whitening_filters(x, 2, 5e-4 * variance)
    for scale in (1.0, 255.0):
        relative = whitening_filters(scale * x, 2, 5e-4, relative=True) * scale
        np.testing.assert_allclose(up_to_sign(relative, expected), expected, atol=1e-6)
        np.testing.assert_allclose(norms(relative), norms(expected), rtol=1e-6)
    absolute = whitening_filters(255.0 * x, 2, 5e-4) * 255.0
    assert np.abs(norms(absolute) / norms(expected) - 1).max() > 1e-4


def test_patch_covariance_is_chunk_independent(monkeypatch):
    """Accumulated over chunks of images (bounded memory), the same covariance."""
    x = _images(2, n=9)
    whole = patch_covariance(x, 2)
    monkeypatch.setattr(init, "_CHUNK_PATCHES", 31)  # about one image per chunk
    np.testing.assert_allclose(patch_covariance(x, 2), whole, rtol=1e-13)


def test_whitening_filters_reject_bad_input():
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        whitening_filters(np.zeros((3, 32, 32)))
    with pytest.raises(ValueError, match="kernel_size 2"):
        whitening_filters(np.zeros((2, 3, 1, 5)))
    with pytest.raises(ValueError, match="eps"):
        whitening_filters(_images(), eps=-1.0)
