"""PNG plots of a training run (matplotlib, no display needed).

matplotlib is imported inside each function, so `import fastnn` stays light.
Every figure is written atomically (fastnn.files.atomic_write) by `save_figure`.
"""
import numpy as np

from fastnn.files import atomic_write

FORMAT_VERSION = 1  # a PNG text chunk "fastnn format version" says it


def _figure():
    import matplotlib

    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path):
    """Write `fig` as a PNG to `path` atomically, tagged with fastnn's plot format version."""
    from fastnn import __version__

    plt = _figure()
    try:
        with atomic_write(path) as fh:
            fig.savefig(fh, format="png", dpi=100, bbox_inches="tight",
                        metadata={"Software": f"fastnn {__version__}",
                                  "fastnn format version": str(FORMAT_VERSION)})
    finally:
        plt.close(fig)


def _moving_average(values, window):
    """The centred mean of `window` neighbours of each value (fewer at the ends), same length."""
    sums = np.concatenate([[0.0], np.cumsum(values)])
    index = np.arange(len(values))
    low = np.maximum(index - window // 2, 0)
    high = np.minimum(index + (window + 1) // 2, len(values))
    return (sums[high] - sums[low]) / (high - low)


def _integer_ticks(axis):
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def plot_loss(loss_history, path, iterations_per_epoch=None):
    """Each minibatch's training loss (faint points) under its moving average (a line).

    The x axis counts epochs when `iterations_per_epoch` is given, else iterations.
    """
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 4))
    loss = np.asarray(loss_history, dtype=np.float64)
    steps = np.arange(1, len(loss) + 1)
    x = steps / iterations_per_epoch if iterations_per_epoch else steps
    # faint where thousands of points overlap, so that the mean line stands out
    ax.plot(x, loss, "o", markersize=3, markeredgewidth=0, alpha=0.3 if len(loss) > 500 else 0.6,
            color="tab:blue", label="minibatch loss")
    window = min(iterations_per_epoch or 100, max(len(loss) // 20, 5), len(loss))
    if window > 1:
        ax.plot(x, _moving_average(loss, window), color="tab:blue", linewidth=2.2,
                label=f"mean of {window} minibatches")
    if iterations_per_epoch:
        ax.set_xlim(left=0)
        _integer_ticks(ax.xaxis)
    ax.set(xlabel="epoch" if iterations_per_epoch else "iteration (minibatch)",
           ylabel="training loss", title="Training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def plot_accuracy(train_acc_history, val_acc_history, path):
    """Train and validation accuracy before training (epoch 0) and after each epoch."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 4))
    epochs = np.arange(len(val_acc_history))
    ax.plot(np.arange(len(train_acc_history)), train_acc_history, "o-", label="train")
    ax.plot(epochs, val_acc_history, "o-", label="validation")
    if len(val_acc_history):
        best = int(np.argmax(val_acc_history))
        ax.plot(best, val_acc_history[best], "*", color="tab:red", markersize=14,
                label=f"best validation: {val_acc_history[best]:.3f} (epoch {best})")
    _integer_ticks(ax.xaxis)
    ax.set(xlabel="epoch (0: before training)", ylabel="accuracy",
           title="Classification accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def plot_first_layer_weights(W1, path, image_shape=(3, 32, 32), max_images=100):
    """The first layer's weights, each unit shown as a colour image, in a grid.

    W1 (3*32*32, H): column j is unit j's template, in R, G, B planes; or conv
    filters W1 (F, C, HH, WW): filter f as an HH x WW image (colour when C is
    3, else the mean over its channels in grey).
    """
    plt = _figure()
    W1 = np.asarray(W1, dtype=np.float64)
    if W1.ndim == 4:
        count = min(W1.shape[0], max_images)
        images = W1[:count].transpose(0, 2, 3, 1)
        if images.shape[-1] != 3:
            images = images.mean(axis=-1, keepdims=True).repeat(3, axis=-1)
    else:
        count = min(W1.shape[1], max_images)
        images = W1[:, :count].T.reshape(count, *image_shape).transpose(0, 2, 3, 1)
    low = images.min(axis=(1, 2, 3), keepdims=True)
    high = images.max(axis=(1, 2, 3), keepdims=True)
    images = (images - low) / np.maximum(high - low, 1e-12)  # each template to [0, 1]
    cols = int(np.ceil(np.sqrt(count)))
    rows = int(np.ceil(count / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.8, rows * 0.8), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < count:
            ax.imshow(images[k], interpolation="nearest")
    fig.suptitle("First-layer filters" if W1.ndim == 4 else "First-layer weights")
    save_figure(fig, path)


def plot_confusion_matrix(matrix, class_names, path):
    """Confusion matrix (rows: true class, columns: predicted), counts in the cells."""
    plt = _figure()
    matrix = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(im, ax=ax)
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, class_names)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix (test set)")
    threshold = matrix.max() / 2 if matrix.size else 0
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                color="white" if count > threshold else "black")
    save_figure(fig, path)
