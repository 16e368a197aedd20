"""The run folder's plots read at a glance: labelled axes in epochs, a smoothed loss line."""
import numpy as np
import pytest

from fastnn import plots
from helpers import PNG_MAGIC


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions make, to inspect (their PNGs are still written)."""
    made = []
    save = plots.save_figure

    def keep(fig, path):
        made.append(fig)
        save(fig, path)

    monkeypatch.setattr(plots, "save_figure", keep)
    return made


def _integer_ticks_in_view(ax):
    low, high = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if low <= t <= high]
    return ticks and all(float(t).is_integer() for t in ticks)


def test_loss_plot_has_a_smoothed_line_over_the_points_in_epochs(figures, tmp_path):
    rng = np.random.default_rng(0)
    loss = 2.3 - 0.01 * np.arange(60) + rng.normal(0, 0.2, 60)
    path = str(tmp_path / "loss.png")
    plots.plot_loss(loss, path, iterations_per_epoch=20)
    assert open(path, "rb").read(8) == PNG_MAGIC
    (ax,) = figures[0].axes
    assert ax.get_xlabel() == "epoch" and _integer_ticks_in_view(ax)
    points, line = ax.get_lines()
    np.testing.assert_allclose(points.get_xdata(), np.arange(1, 61) / 20)  # 3 epochs
    np.testing.assert_allclose(points.get_ydata(), loss)
    # the mean line spans the whole run and is smoother than the points
    np.testing.assert_allclose(line.get_xdata(), points.get_xdata())
    assert np.std(np.diff(line.get_ydata())) < np.std(np.diff(loss)) / 3
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[0] == "minibatch loss" and labels[1].startswith("mean of")


def test_loss_plot_counts_iterations_without_an_epoch_length(figures, tmp_path):
    plots.plot_loss([2.3, 2.2, 2.0], str(tmp_path / "loss.png"))
    (ax,) = figures[0].axes
    assert ax.get_xlabel().startswith("iteration")
    np.testing.assert_allclose(ax.get_lines()[0].get_xdata(), [1, 2, 3])


def test_accuracy_plot_has_integer_epochs_and_marks_the_best(figures, tmp_path):
    plots.plot_accuracy([0.1, 0.3, 0.45], [0.12, 0.4, 0.38], str(tmp_path / "accuracy.png"))
    (ax,) = figures[0].axes
    assert ax.get_xlabel().startswith("epoch") and _integer_ticks_in_view(ax)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["train", "validation", "best validation: 0.400 (epoch 1)"]
