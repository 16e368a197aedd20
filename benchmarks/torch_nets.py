"""The conv workloads' nets in PyTorch, built from a fastnn model's initial parameters.

Same structure, same initial values (copied, so the init scheme is the same
by construction), float32, NCHW; a trainer may convert the module to
channels-last. Only the benchmarks import this (PyTorch is optional).
"""
import numpy as np
import torch
from torch import nn


def _tensor(array):
    return torch.from_numpy(np.array(array, dtype=np.float32))


def _set(parameter, array):
    with torch.no_grad():
        parameter.copy_(_tensor(array).reshape(parameter.shape))


class _GlobalMax(nn.Module):
    """The maximum over the remaining positions of each channel: (N, C, H, W) -> (N, C)."""

    def forward(self, x):
        return torch.amax(x, dim=(2, 3))


def three_layer_conv(model):
    """ThreeLayerConvNet -> conv - relu - 2x2 max pool - linear - relu - linear."""
    p = {k: np.asarray(v) for k, v in model.params.items()}
    filters, channels, size, _ = p["W1"].shape
    conv = nn.Conv2d(channels, filters, size, stride=1, padding=model.conv_param["pad"])
    fc1 = nn.Linear(*p["W2"].shape)
    fc2 = nn.Linear(*p["W3"].shape)
    _set(conv.weight, p["W1"])
    _set(conv.bias, p["b1"])
    for linear, w, b in ((fc1, "W2", "b2"), (fc2, "W3", "b3")):
        _set(linear.weight, p[w].T)  # fastnn's affine is x @ W (D, M); torch's is x @ W.T
        _set(linear.bias, p[b])
    return nn.Sequential(conv, nn.ReLU(), nn.MaxPool2d(2, 2), nn.Flatten(), fc1, nn.ReLU(), fc2)


def convnet(model, widths, stem_width, channels=3, num_classes=10):
    """ConvNet -> stem, groups (conv - pool - bn - relu - conv - bn - relu), global max, linear.

    The parameters are taken in the order the contract lists the layers:
    the n-th filter of the net is W{n}, its batchnorm gamma{n} / beta{n}
    (the momentum matches fastnn's running average: torch's 0.1 = 1 - 0.9).
    """
    p = {k: np.asarray(v) for k, v in model.params.items()}
    layers, c_in, n = [], channels, 0

    def conv_bn(c_in, c_out, pool):
        nonlocal n
        n += 1
        conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        bn = nn.BatchNorm2d(c_out, eps=1e-5, momentum=0.1)
        _set(conv.weight, p[f"W{n}"])
        _set(bn.weight, p[f"gamma{n}"])
        _set(bn.bias, p[f"beta{n}"])
        return [conv] + ([nn.MaxPool2d(2, 2)] if pool else []) + [bn, nn.ReLU()]

    layers += conv_bn(c_in, stem_width, pool=False)
    c_in = stem_width
    for w in widths:
        layers += conv_bn(c_in, w, pool=True) + conv_bn(w, w, pool=False)
        c_in = w
    fc = nn.Linear(c_in, num_classes)
    _set(fc.weight, p[f"W{n + 1}"].T)
    _set(fc.bias, p[f"b{n + 1}"])
    expected = {f"W{i}" for i in range(1, n + 2)} | {f"gamma{i}" for i in range(1, n + 1)} | \
        {f"beta{i}" for i in range(1, n + 1)} | {f"b{n + 1}"}
    if set(p) != expected:
        raise ValueError(f"ConvNet parameters {sorted(p)} are not the {sorted(expected)} this "
                         "copy expects; update benchmarks/torch_nets.py")
    return nn.Sequential(*layers, _GlobalMax(), fc)

