"""The main job's recipe in PyTorch (CPU, channels-last), with fastnn's semantics.

A reference for `fastnn train`'s defaults: the contract's ConvNet, He init,
flips and zero-padded translations (fastnn's augment), label smoothing, SGD
with Nesterov momentum, L2 on filters and the affine weight only, the
one-cycle schedule of fastnn.schedules, and flip test-time averaging.

    python benchmarks/convnet_recipe_torch.py --epochs 11 --lr 0.2
"""
import argparse
import math
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, ".")
from fastnn.data import get_cifar10_data  # noqa: E402
from fastnn.schedules import lr_factor  # noqa: E402


class Net(nn.Module):
    def __init__(self, widths=(32, 64, 128), stem=24):
        super().__init__()
        layers = [nn.Conv2d(3, stem, 3, padding=1, bias=False), nn.BatchNorm2d(stem), nn.ReLU()]
        c = stem
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.MaxPool2d(2),
                       nn.BatchNorm2d(w), nn.ReLU(),
                       nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
            c = w
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(c, 10)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        nn.init.normal_(self.fc.weight, std=1 / math.sqrt(c))
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        return self.fc(self.body(x).amax(dim=(2, 3)))


def augment(x, rng, pad):
    n = x.shape[0]
    flips = rng.random(n) < 0.5
    x = x.copy()
    x[flips] = x[flips, :, :, ::-1]
    if pad:
        padded = np.zeros((n, 3, 32 + 2 * pad, 32 + 2 * pad), np.float32)
        padded[:, :, pad:pad + 32, pad:pad + 32] = x
        dy, dx = rng.integers(0, 2 * pad + 1, n), rng.integers(0, 2 * pad + 1, n)
        for i in range(n):
            x[i] = padded[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32]
    return x


def accuracy(net, X, y, tta):
    net.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(X), 500):
            xb = torch.from_numpy(X[i:i + 500]).contiguous(memory_format=torch.channels_last)
            s = net(xb).softmax(1) if tta else net(xb)
            if tta:
                s = s + net(torch.flip(xb, dims=(3,))).softmax(1)
            correct += int((s.argmax(1).numpy() == y[i:i + 500]).sum())
    net.train()
    return correct / len(X)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=11)
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--reg", type=float, default=5e-4)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--smoothing", type=float, default=0.2)
    p.add_argument("--pad", type=int, default=2)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--pct-start", type=float, default=0.3)
    p.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--stem", type=int, default=24)
    p.add_argument("--num-training", type=int, default=49000)
    a = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    t0 = time.time()
    d = get_cifar10_data(num_training=a.num_training, num_validation=1000, num_test=10000)
    net = Net(tuple(a.widths), a.stem).to(memory_format=torch.channels_last)
    decay = [p_ for n, p_ in net.named_parameters() if p_.ndim > 1]
    rest = [p_ for n, p_ in net.named_parameters() if p_.ndim == 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": a.reg},
                           {"params": rest, "weight_decay": 0}],
                          lr=a.lr, momentum=a.momentum, nesterov=True)
    rng = np.random.default_rng(0)
    n = len(d["X_train"])
    per_epoch = n // a.batch
    total = per_epoch * a.epochs
    t = 0
    for epoch in range(a.epochs):
        order = rng.permutation(n)
        te = time.time()
        for i in range(per_epoch):
            idx = order[i * a.batch:(i + 1) * a.batch]
            xb = augment(d["X_train"][idx], rng, a.pad)
            xb = torch.from_numpy(xb).contiguous(memory_format=torch.channels_last)
            yb = torch.from_numpy(d["y_train"][idx])
            f = lr_factor("onecycle", t, total, per_epoch, {"pct_start": a.pct_start})
            for g in opt.param_groups:
                g["lr"] = a.lr * f
            loss = F.cross_entropy(net(xb), yb, label_smoothing=a.smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            t += 1
        val = accuracy(net, d["X_val"], d["y_val"], False)
        print(f"epoch {epoch + 1}: loss {loss.item():.3f} val {val:.3f} "
              f"{per_epoch * a.batch / (time.time() - te):.0f} img/s", flush=True)
    test = accuracy(net, d["X_test"], d["y_test"], False)
    test_tta = accuracy(net, d["X_test"], d["y_test"], True)
    print(f"{vars(a)} test {test:.4f} tta {test_tta:.4f} wall {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
