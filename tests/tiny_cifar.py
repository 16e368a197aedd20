"""A tiny CIFAR-10 folder in the official layout, for CLI, example and tune tests."""
import os
import pickle

import numpy as np

CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck"]


def write_tiny_cifar(root, per_batch=40, num_test=50, seed=0):
    """Write root/cifar-10-batches-py with 5 x per_batch training and num_test test images.

    Each class has its own mean colour, so the data are learnable. Returns root.
    """
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    colours = rng.integers(30, 225, size=(10, 3))

    def batch(n, label):
        labels = rng.integers(0, 10, size=n)
        pixels = colours[labels][:, :, None] + rng.normal(0, 40, size=(n, 3, 1024))
        data = np.clip(pixels, 0, 255).astype(np.uint8).reshape(n, 3072)
        with open(os.path.join(folder, label), "wb") as fh:
            pickle.dump({b"data": data, b"labels": [int(v) for v in labels],
                         b"batch_label": label.encode(),
                         b"filenames": [f"{label}_{i}.png".encode() for i in range(n)]}, fh)

    for i in range(1, 6):
        batch(per_batch, f"data_batch_{i}")
    batch(num_test, "test_batch")
    with open(os.path.join(folder, "batches.meta"), "wb") as fh:
        pickle.dump({b"label_names": [c.encode() for c in CLASSES]}, fh)
    return root
