"""airbench94's training (KellerJordan/cifar10-airbench, legacy/airbench94.py) in PyTorch on
the CPU: the peer that `fastnn train --recipe airbench94` is measured against.

The same net, hyperparameters, schedule, Lookahead, alternating flips, reflect-
padded translations and test-time augmentation as airbench94.py, changed only
where a CPU needs it: float32 instead of half, channels-last or NCHW (--layout),
`--threads` threads, the data from fastnn's CIFAR-10 copy. By default it trains on
the same split as `fastnn train` (the first 49,000 training images; --num-training
50000 is airbench's) and tests on all 10,000 test images; images are normalised
by CIFAR's channel means and deviations as airbench does. `--widths 32 64 128` is
the recipe at the main job's widths.

    python benchmarks/airbench_torch.py --widths 64 256 256 --epochs 10
    python benchmarks/airbench_torch.py --steps 20 --batch-size 512   # step rate only

`--muon` trains airbench94_muon.py's recipe instead (fastnn's `airbench_muon` and
`airbench94_muon`): its Muon on the 3x3 filters, Nesterov SGD on the rest (bias lr
0.053, head lr 0.67 with the head's weights at std 1 and its scores over the width,
weight decay 2e-6 per example of a step), batch 2000, 8 epochs, the rates straight
down to 0, no Lookahead; the whitening bias learns 3 epochs at the common rate, as
fastnn's recipe has it (airbench94_muon.py takes its rate down to 0 over them).

    python benchmarks/airbench_torch.py --muon --widths 32 112 176

Only the benchmarks import this (PyTorch is optional).
"""
import argparse
import math
import resource
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, ".")
from fastnn.data import load_cifar10  # noqa: E402

HYP = {"lr": 11.5, "momentum": 0.85, "weight_decay": 0.0153, "bias_scaler": 64.0,
       "label_smoothing": 0.2, "whiten_bias_epochs": 3, "translate": 2,
       "batchnorm_momentum": 0.6, "scaling_factor": 1 / 9, "tta_level": 2}
MUON_HYP = {"bias_lr": 0.053, "head_lr": 0.67, "weight_decay": 2e-6, "momentum": 0.85,
            "muon_lr": 0.24, "muon_momentum": 0.6, "epochs": 8, "batch_size": 2000}
CIFAR_MEAN = torch.tensor((0.4914, 0.4822, 0.4465))
CIFAR_STD = torch.tensor((0.2470, 0.2435, 0.2616))


# -- the net (airbench94.py's, in float32) -----------------------------------------
class BatchNorm(nn.BatchNorm2d):
    def __init__(self, num_features, momentum, eps=1e-12):
        super().__init__(num_features, eps=eps, momentum=1 - momentum)
        self.weight.requires_grad = False  # frozen scale: only the shift learns


class Conv(nn.Conv2d):
    def __init__(self, in_channels, out_channels, kernel_size=3, padding="same", bias=False):
        super().__init__(in_channels, out_channels, kernel_size=kernel_size, padding=padding,
                         bias=bias)

    def reset_parameters(self):
        super().reset_parameters()
        if self.bias is not None:
            self.bias.data.zero_()
        w = self.weight.data
        torch.nn.init.dirac_(w[:w.size(1)])


class ConvGroup(nn.Module):
    def __init__(self, channels_in, channels_out, batchnorm_momentum):
        super().__init__()
        self.conv1 = Conv(channels_in, channels_out)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = BatchNorm(channels_out, batchnorm_momentum)
        self.conv2 = Conv(channels_out, channels_out)
        self.norm2 = BatchNorm(channels_out, batchnorm_momentum)
        self.activ = nn.GELU()

    def forward(self, x):
        x = self.activ(self.norm1(self.pool(self.conv1(x))))
        return self.activ(self.norm2(self.conv2(x)))


class Mul(nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return x * self.scale


def make_net(widths, channels_last=True, muon=False):
    """airbench94's net; muon: airbench94_muon's head (weights at std 1, scores over the
    width)."""
    whiten_width = 2 * 3 * 2 ** 2
    net = nn.Sequential(
        Conv(3, whiten_width, 2, padding=0, bias=True), nn.GELU(),
        ConvGroup(whiten_width, widths[0], HYP["batchnorm_momentum"]),
        ConvGroup(widths[0], widths[1], HYP["batchnorm_momentum"]),
        ConvGroup(widths[1], widths[2], HYP["batchnorm_momentum"]),
        nn.MaxPool2d(3), nn.Flatten(), nn.Linear(widths[2], 10, bias=False),
        Mul(1 / widths[2] if muon else HYP["scaling_factor"]))
    net[0].weight.requires_grad = False
    if muon:
        head = net[-2].weight.data
        head *= 1 / head.std()
    return net.to(memory_format=torch.channels_last) if channels_last else net


def init_whitening_conv(layer, train_images, eps=5e-4):
    """airbench's: the 2x2 patches' covariance eigenvectors over sqrt(eigenvalue + eps)."""
    c, (h, w) = train_images.shape[1], layer.weight.shape[2:]
    patches = train_images.unfold(2, h, 1).unfold(3, w, 1).transpose(1, 3).reshape(-1, c, h, w)
    flat = patches.reshape(len(patches), -1).double()
    eigenvalues, eigenvectors = torch.linalg.eigh(flat.T @ flat / len(flat), UPLO="U")
    eigenvalues = eigenvalues.flip(0).view(-1, 1, 1, 1)
    eigenvectors = eigenvectors.T.reshape(c * h * w, c, h, w).flip(0)
    scaled = (eigenvectors / torch.sqrt(eigenvalues + eps)).float()
    layer.weight.data[:] = torch.cat((scaled, -scaled))


def optimizer_for(net, batch_size):
    """airbench94's SGD: its decoupled lr and weight decay in torch's terms, the batchnorm
    shifts' lr x bias_scaler."""
    kilostep_scale = 1024 * (1 + 1 / (1 - HYP["momentum"]))
    lr = HYP["lr"] / kilostep_scale
    wd = HYP["weight_decay"] * batch_size / kilostep_scale
    lr_biases = lr * HYP["bias_scaler"]
    norm_biases = [p for k, p in net.named_parameters() if "norm" in k and p.requires_grad]
    others = [p for k, p in net.named_parameters() if "norm" not in k and p.requires_grad]
    return torch.optim.SGD([dict(params=norm_biases, lr=lr_biases, weight_decay=wd / lr_biases),
                            dict(params=others, lr=lr, weight_decay=wd / lr)],
                           momentum=HYP["momentum"], nesterov=True)


def orthogonalize(g, steps=3, eps=1e-7):
    """airbench94_muon's zeropower_via_newtonschulz5, in float32 (not bfloat16)."""
    a, b, c = (3.4445, -4.7750, 2.0315)
    x = g / (g.norm() + eps)
    if g.size(0) > g.size(1):
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if g.size(0) > g.size(1) else x


class Muon(torch.optim.Optimizer):
    """airbench94_muon's Muon (Nesterov): momentum, the weights' norm reset to sqrt(F), the
    step orthogonalised."""

    def __init__(self, params, lr, momentum):
        super().__init__(params, dict(lr=lr, momentum=momentum))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                buf.mul_(group["momentum"]).add_(p.grad)
                g = p.grad.add(buf, alpha=group["momentum"])
                p.mul_(len(p) ** 0.5 / p.norm())
                p.add_(orthogonalize(g.reshape(len(g), -1)).view(g.shape), alpha=-group["lr"])


def muon_optimizers(net, batch_size):
    """airbench94_muon's two optimizers: SGD for the biases and the head (wd / lr per group),
    Muon for the 3x3 filters."""
    hyp, named = MUON_HYP, list(net.named_parameters())
    wd = hyp["weight_decay"] * batch_size
    biases = [p for k, p in named if p.requires_grad and p.ndim == 1]   # whitening, norms
    head = [p for k, p in named if p.requires_grad and p.ndim == 2]
    filters = [p for k, p in named if p.requires_grad and p.ndim == 4]
    sgd = torch.optim.SGD([dict(params=biases, lr=hyp["bias_lr"], weight_decay=wd / hyp["bias_lr"]),
                           dict(params=head, lr=hyp["head_lr"], weight_decay=wd / hyp["head_lr"])],
                          momentum=hyp["momentum"], nesterov=True)
    return [sgd, Muon(filters, hyp["muon_lr"], hyp["muon_momentum"])]


# -- data and augmentation (airbench94.py's CifarLoader) ---------------------------
def batch_crop(images, crop_size):
    r = (images.size(-1) - crop_size) // 2
    shifts = torch.randint(-r, r + 1, size=(len(images), 2))
    out = torch.empty((len(images), 3, crop_size, crop_size), dtype=images.dtype)
    for sy in range(-r, r + 1):
        for sx in range(-r, r + 1):
            mask = (shifts[:, 0] == sy) & (shifts[:, 1] == sx)
            out[mask] = images[mask, :, r + sy:r + sy + crop_size, r + sx:r + sx + crop_size]
    return out


def train_batches(images, labels, batch_size, epoch, padded):
    """One epoch's batches: the pre-flipped, reflect-padded images (made in epoch 0),
    cropped at random, all flipped on odd epochs, shuffled; the last partial batch dropped."""
    out = batch_crop(padded, images.shape[-2])
    if epoch % 2 == 1:
        out = out.flip(-1)
    order = torch.randperm(len(out))
    for i in range(len(out) // batch_size):
        idx = order[i * batch_size:(i + 1) * batch_size]
        yield out[idx], labels[idx]


def normalised(x_uint8_nhwc):
    x = torch.from_numpy(np.ascontiguousarray(x_uint8_nhwc, dtype=np.float32)) / 255
    x = x.permute(0, 3, 1, 2)
    return ((x - CIFAR_MEAN.view(1, 3, 1, 1)) / CIFAR_STD.view(1, 3, 1, 1)).contiguous()


# -- evaluation (airbench94.py's infer) --------------------------------------------
def infer(net, images, tta_level, layout):
    def basic(x):
        return net(x)

    def mirror(x):
        return 0.5 * net(x) + 0.5 * net(x.flip(-1))

    def mirror_translate(x):
        logits = mirror(x)
        padded = F.pad(x, (1,) * 4, "reflect")
        shifted = [mirror(layout(padded[:, :, 0:32, 0:32])),
                   mirror(layout(padded[:, :, 2:34, 2:34]))]
        return 0.5 * logits + 0.5 * torch.stack(shifted).mean(0)

    fn = [basic, mirror, mirror_translate][tta_level]
    net.eval()
    with torch.no_grad():
        out = torch.cat([fn(layout(x)) for x in images.split(2000)])
    net.train()
    return out


def accuracy(net, images, labels, tta_level, layout):
    return (infer(net, images, tta_level, layout).argmax(1) == labels).float().mean().item()


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=int, nargs=3, default=[64, 256, 256])
    parser.add_argument("--epochs", type=float, default=None,
                        help="fastnn's airbench94 recipe: 10 (airbench94.py: 9.9); --muon: 8")
    parser.add_argument("--batch-size", type=int, default=None, help="1024; --muon: 2000")
    parser.add_argument("--muon", action="store_true",
                        help="airbench94_muon's recipe (fastnn's airbench_muon)")
    parser.add_argument("--layout", choices=("channels_last", "nchw"), default="channels_last")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-training", type=int, default=49000)
    parser.add_argument("--data", default=None, help="fastnn's CIFAR-10 folder ($FASTNN_DATA)")
    parser.add_argument("--steps", type=int, default=0,
                        help="time this many training steps (after 3 warm-up steps) and stop")
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = float(MUON_HYP["epochs"]) if args.muon else 10.0
    if args.batch_size is None:
        args.batch_size = MUON_HYP["batch_size"] if args.muon else 1024
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    channels_last = args.layout == "channels_last"

    def layout(x):
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    start = time.perf_counter()
    X_train, y_train, X_test, y_test = load_cifar10(args.data)
    train_images = normalised(X_train[:args.num_training])
    train_labels = torch.from_numpy(np.asarray(y_train[:args.num_training], dtype=np.int64))
    test_images = normalised(X_test)
    test_labels = torch.from_numpy(np.asarray(y_test, dtype=np.int64))

    net = make_net(args.widths, channels_last, args.muon)
    init_whitening_conv(net[0], train_images[:5000])
    optimizers = (muon_optimizers(net, args.batch_size) if args.muon
                  else [optimizer_for(net, args.batch_size)])
    loss_fn = nn.CrossEntropyLoss(label_smoothing=HYP["label_smoothing"], reduction="none")
    per_epoch = len(train_images) // args.batch_size
    total = math.ceil(per_epoch * args.epochs) if not args.steps else args.steps + 3
    warmup = int(total * 0.23)

    def lr_factor(step):  # airbench94's triangle; airbench94_muon's straight line
        if args.muon:
            return 1.0 - step / total
        if step < warmup:
            return 0.2 + 0.8 * step / warmup
        return 1.0 - 0.93 * (step - warmup) / (total - warmup)

    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lr_factor) for o in optimizers]
    alpha = 0.95 ** 5 * (torch.arange(total + 1) / total) ** 3
    ema = {k: v.clone() for k, v in net.state_dict().items()}

    def lookahead(decay):
        for ema_param, param in zip(ema.values(), net.state_dict().values()):
            if param.dtype == torch.float:
                ema_param.lerp_(param, 1 - decay)
                param.copy_(ema_param)

    # epoch 0's preprocessing, as CifarLoader: a coin flip per image, then reflect padding
    flips = (torch.rand(len(train_images)) < 0.5).view(-1, 1, 1, 1)
    flipped = torch.where(flips, train_images.flip(-1), train_images)
    padded = F.pad(flipped, (HYP["translate"],) * 4, "reflect")
    step, step_times, done = 0, [], False
    for epoch in range(math.ceil(total / per_epoch)):
        net[0].bias.requires_grad = epoch < HYP["whiten_bias_epochs"]
        epoch_start = time.perf_counter()
        for inputs, labels in train_batches(train_images, train_labels, args.batch_size, epoch,
                                            padded):
            t0 = time.perf_counter()
            loss = loss_fn(net(layout(inputs)), labels).sum()
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for optimizer, scheduler in zip(optimizers, schedulers):
                optimizer.step()
                scheduler.step()
            step += 1
            if step % 5 == 0 and not args.muon:
                lookahead(alpha[step].item())
            step_times.append(time.perf_counter() - t0)
            if step >= total:
                if not args.muon:
                    lookahead(1.0)
                done = True
                break
        if args.steps:
            if done:
                break
            continue
        seconds = time.perf_counter() - epoch_start
        print(f"epoch {epoch + 1}: loss {loss.item() / args.batch_size:.4f}, "
              f"{per_epoch * args.batch_size / seconds:.0f} img/s, "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        if done:
            break
    if args.steps:
        median = float(np.median(step_times[3:]))
        print(f"airbench net {tuple(args.widths)} {args.layout}, batch {args.batch_size}, "
              f"{args.threads} threads: {1e3 * median:.1f} ms/step median of {args.steps}, "
              f"{args.batch_size / median:.0f} img/s")
        return
    train_seconds = time.perf_counter() - start
    plain = accuracy(net, test_images, test_labels, 0, layout)
    tta = accuracy(net, test_images, test_labels, HYP["tta_level"], layout)
    print(f"widths {tuple(args.widths)} {'muon ' if args.muon else ''}{args.layout} "
          f"batch {args.batch_size} seed {args.seed}: "
          f"test {plain:.4f}, tta2 {tta:.4f}; wall {time.perf_counter() - start:.0f} s "
          f"({train_seconds:.0f} s to the end of training), peak RSS {peak_rss_gb():.2f} GB",
          flush=True)


if __name__ == "__main__":
    main()
