"""Initialisers computed from data: the patch-whitening filters of a first conv layer.

`whitening_filters(X)` is airbench's `init_whitening_conv` (KellerJordan/cifar10-airbench:
get_patches, get_whitening_parameters) in NumPy on host arrays: a conv with these filters
maps each k x k patch to its coordinates in the eigenbasis of the patches' (uncentered)
covariance, each scaled to about unit variance, and to their negatives.
"""
import numpy as np

from fastnn.backend import to_numpy

_CHUNK_PATCHES = 1 << 19  # patches per covariance chunk: bounded scratch (~50 MB float64 at K 12)


def patch_covariance(X, kernel_size=2):
    """The uncentered covariance (patches.T @ patches / n) of every k x k patch (stride 1,
    no padding) of images X (N, C, H, W) -> (C*k*k, C*k*k) float64, patches flattened
    in (C, k, k) order as conv filters are. Accumulated over chunks of images, so memory
    stays bounded however many images there are."""
    X = to_numpy(X)
    if X.ndim != 4 or X.shape[0] == 0 or min(X.shape[2:]) < kernel_size:
        raise ValueError(f"patch_covariance needs images (N, C, H, W) with N >= 1 and H, W >= "
                         f"kernel_size {kernel_size}; got shape {X.shape}")
    n, channels, height, width = X.shape
    k = kernel_size
    size = channels * k * k
    per_image = (height - k + 1) * (width - k + 1)
    step = max(1, _CHUNK_PATCHES // per_image)
    covariance = np.zeros((size, size))
    for start in range(0, n, step):
        chunk = X[start:start + step].astype(np.float64)
        # (n, C, H', W', k, k) -> one row per patch, its numbers in (C, k, k) order
        windows = np.lib.stride_tricks.sliding_window_view(chunk, (k, k), axis=(2, 3))
        patches = windows.transpose(0, 2, 3, 1, 4, 5).reshape(-1, size)
        covariance += patches.T @ patches
    return covariance / (n * per_image)


def whitening_filters(X, kernel_size=2, eps=5e-4, relative=False):
    """Patch-whitening conv filters from images X (N, C, H, W) (any backend) -> a host
    float64 array (2*C*k*k, C, k, k).

    Filter i < C*k*k is the covariance's eigenvector of the i-th largest eigenvalue
    divided by sqrt(eigenvalue + eps); filters C*k*k.. are their negatives (so a relu
    or gelu after the conv passes both signs). Eigenvector signs are LAPACK's.

    relative: eps in units of the patches' mean variance (the covariance's mean
    diagonal), so the filters whiten alike however the images are scaled. airbench's
    eps 5e-4 is for images normalised to unit variance per channel, where the two
    agree; fastnn's get_cifar10_data gives mean-subtracted 0-255 pixels (~4000).
    """
    if not eps >= 0:
        raise ValueError(f"whitening_filters: eps must be >= 0, got {eps}")
    covariance = patch_covariance(X, kernel_size)
    if relative:
        eps = eps * float(np.mean(np.diag(covariance)))
    channels = covariance.shape[0] // (kernel_size * kernel_size)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance, UPLO="U")  # ascending
    eigenvalues, eigenvectors = eigenvalues[::-1], eigenvectors.T[::-1]  # rows, descending
    # round-off can leave a zero eigenvalue slightly negative: clamp so eps alone scales it
    scaled = eigenvectors / np.sqrt(np.maximum(eigenvalues, 0.0) + eps)[:, None]
    filters = scaled.reshape(-1, channels, kernel_size, kernel_size)
    return np.concatenate([filters, -filters])
