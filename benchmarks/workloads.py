"""What the end-to-end benchmarks train: the net, the data's shape, the batch and the rule.

Each entry of WORKLOADS is data: a `Workload(name, net, batch_size, rule,
...)`. Its net says what is trained (the fastnn model, its PyTorch twin, the
input shape, the matrix products of a step; `kind` "fc" for flattened images,
"conv" for (3, 32, 32) ones); its rule how (a fastnn update rule and learning
rate, and PyTorch's twin). A new workload is one entry, plus a net class when
no existing one builds its model. Who trains it is in trainers.py; the
machine it runs on in machine.py.

FLOPs per training step count only the matrix products the step must do:
2*N*in*out per layer forward, 2*N*in*out per layer for dW, and 2*N*in*out
per layer for dX except the first layer (its input needs no gradient). A
convolution counts as a product with fan_in = C_in * kh * kw and fan_out =
C_out at each of its output positions (2 * N * positions * fan_in * fan_out
per product). The conv workloads train on a subset of the training images
per epoch (Workload.num_train) to keep a report run short.
"""
import dataclasses
import importlib
import os

import numpy as np

import fastnn

NUM_TRAIN = 49000
NUM_VAL = 1000
INPUT_DIM = 3 * 32 * 32
IMAGE_SHAPE = (3, 32, 32)
NUM_CLASSES = 10
NUM_TRAIN_SAMPLES = 1000   # Solver's default train-accuracy subsample
CHECK_BATCH_SIZE = 128     # Solver.check_accuracy's default batch
CONV_NUM_TRAIN = 10240     # training images per conv epoch (a subset keeps a report short)


def products_flops(layers, batch_size):
    """Matrix-product FLOPs of a training step over `layers` [(name, fan_in, fan_out, positions)].

    Forward, dW, and dX except for the first layer (its input needs no gradient).
    """
    total = 0
    for i, (_, fan_in, fan_out, positions) in enumerate(layers):
        products = 3 if i > 0 else 2
        total += products * 2 * batch_size * positions * fan_in * fan_out
    return total


# -- nets: what is trained ---------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FullyConnected:
    """FullyConnectedNet(hidden_dims, use_batchnorm, dropout, seed=0) on flattened images.

    The naive baseline (naive.py) builds the same net from these fields and weight_scale.
    """
    hidden_dims: tuple
    use_batchnorm: bool = False
    dropout: float = 0.0
    kind = "fc"
    input_shape = (INPUT_DIM,)
    weight_scale = 1e-2  # fastnn's default init scale, copied by the naive baseline

    @property
    def dims(self):
        return (INPUT_DIM, *self.hidden_dims, NUM_CLASSES)

    def layers(self):
        """[(name, fan_in, fan_out, positions)] of the matrix products, input first."""
        return [(f"affine{i}", fan_in, fan_out, 1)
                for i, (fan_in, fan_out) in enumerate(zip(self.dims[:-1], self.dims[1:]), 1)]

    def fastnn_model(self):
        from fastnn.classifiers.fc_net import FullyConnectedNet

        return FullyConnectedNet(list(self.hidden_dims), use_batchnorm=self.use_batchnorm,
                                 dropout=self.dropout, seed=0)

    def torch_model(self):
        """nn.Sequential of Linear, [BatchNorm1d], ReLU, [Dropout]; PyTorch's default init."""
        from torch import nn

        layers, fan_in = [], INPUT_DIM
        for width in self.hidden_dims:
            layers.append(nn.Linear(fan_in, width))
            if self.use_batchnorm:
                layers.append(nn.BatchNorm1d(width))
            layers.append(nn.ReLU())
            if self.dropout:
                layers.append(nn.Dropout(self.dropout))
            fan_in = width
        layers.append(nn.Linear(fan_in, NUM_CLASSES))
        return nn.Sequential(*layers)

    def torch_parameters(self, model):
        """What the PyTorch optimizer updates: every parameter, no decay (reg is 0)."""
        return model.parameters()


@dataclasses.dataclass(frozen=True)
class TwoLayer(FullyConnected):
    """TwoLayerNet(hidden_dim=hidden_dims[0]): one hidden layer, its own init scale."""
    weight_scale = 1e-3  # TwoLayerNet's default

    def __post_init__(self):
        if len(self.hidden_dims) != 1 or self.use_batchnorm or self.dropout:
            raise ValueError(f"TwoLayer is one hidden layer without batchnorm or dropout, got "
                             f"{self}; use FullyConnected for the rest")

    def fastnn_model(self):
        from fastnn.classifiers.fc_net import TwoLayerNet

        return TwoLayerNet(hidden_dim=self.hidden_dims[0])


def _torch_l2_groups(model, reg):
    """fastnn's L2: reg on the weights only, as weight_decay; no decay on the rest."""
    weights = [p for p in model.parameters() if p.ndim > 1]
    others = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": weights, "weight_decay": reg}, {"params": others, "weight_decay": 0.0}]


def _host_model(net):
    """The fastnn model on numpy (its initial parameters seed the PyTorch twin)."""
    with fastnn.use_backend("numpy"):
        return net.fastnn_model()


@dataclasses.dataclass(frozen=True)
class ThreeLayerConv:
    """ThreeLayerConvNet after np.random.seed(0): conv (same size) - relu - 2x2 pool - hidden - 10.

    PyTorch trains the same net from fastnn's initial parameters (torch_nets.py).
    """
    hidden_dim: int
    weight_scale: float
    reg: float
    num_filters: int = 32
    filter_size: int = 7
    kind = "conv"
    input_shape = IMAGE_SHAPE

    def layers(self):
        """[(name, fan_in, fan_out, positions)]: the conv as a product per output position."""
        channels, height, width = IMAGE_SHAPE
        pooled = self.num_filters * (height // 2) * (width // 2)
        return [("conv", channels * self.filter_size ** 2, self.num_filters, height * width),
                ("affine1", pooled, self.hidden_dim, 1),
                ("affine2", self.hidden_dim, NUM_CLASSES, 1)]

    def fastnn_model(self):
        from fastnn import classifiers

        state = np.random.get_state()
        np.random.seed(0)  # ThreeLayerConvNet draws from np.random, as the course's does
        try:
            return classifiers.ThreeLayerConvNet(
                num_filters=self.num_filters, filter_size=self.filter_size,
                weight_scale=self.weight_scale, hidden_dim=self.hidden_dim, reg=self.reg)
        finally:
            np.random.set_state(state)

    def torch_model(self):
        import torch_nets

        return torch_nets.three_layer_conv(_host_model(self))

    def torch_parameters(self, model):
        return _torch_l2_groups(model, self.reg)


@dataclasses.dataclass(frozen=True)
class ConvNet:
    """ConvNet(widths, stem_width, seed=0): stem, groups (conv - pool - bn - relu - conv - bn -
    relu), global max, linear; 3x3 convs. PyTorch's twin starts from fastnn's parameters."""
    widths: tuple
    stem_width: int
    reg = 0.0  # ConvNet's default
    kind = "conv"
    input_shape = IMAGE_SHAPE

    def layers(self):
        """[(name, fan_in, fan_out, positions)]: each conv as a product per output position."""
        channels, height, width = IMAGE_SHAPE
        layers = [("stem", channels * 9, self.stem_width, height * width)]
        c_in = self.stem_width
        for i, w in enumerate(self.widths, 1):
            layers.append((f"group{i}.conv1", c_in * 9, w, height * width))
            height, width = height // 2, width // 2  # the pool after the first conv
            layers.append((f"group{i}.conv2", w * 9, w, height * width))
            c_in = w
        return layers + [("affine", c_in, NUM_CLASSES, 1)]

    def fastnn_model(self):
        from fastnn import classifiers

        return classifiers.ConvNet(widths=self.widths, stem_width=self.stem_width, seed=0)

    def torch_model(self):
        import torch_nets

        return torch_nets.convnet(_host_model(self), self.widths, self.stem_width)

    def torch_parameters(self, model):
        return _torch_l2_groups(model, self.reg)


# -- rules: how it is trained --------------------------------------------------
# fastnn rule -> its PyTorch twin, at fastnn's default hyperparameters
_TORCH_OPTIMIZERS = {
    "adam": lambda optim, params, lr, capturable: optim.Adam(params, lr=lr,
                                                             capturable=capturable),
    "sgd_momentum": lambda optim, params, lr, capturable: optim.SGD(params, lr=lr, momentum=0.9),
}


@dataclasses.dataclass(frozen=True)
class Rule:
    """A fastnn update rule (fastnn.optim) at `learning_rate`, its other settings the defaults."""
    name: str
    learning_rate: float

    def __post_init__(self):
        if self.name not in _TORCH_OPTIMIZERS:
            raise ValueError(f"rule {self.name!r} has no PyTorch twin; add it to "
                             f"_TORCH_OPTIMIZERS (known: {sorted(_TORCH_OPTIMIZERS)})")

    def solver_options(self):
        return {"update_rule": self.name, "optim_config": {"learning_rate": self.learning_rate}}

    def torch_optimizer(self, params, capturable=False):
        import torch

        return _TORCH_OPTIMIZERS[self.name](torch.optim, params, self.learning_rate, capturable)


# -- workloads -------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Workload:
    """A net trained with `rule` at `batch_size`, on the 49,000 / 1,000 split.

    num_train: training images an epoch draws from (None: all); warmup_steps:
    the length of the untimed warm-up epoch (None: a whole epoch).
    """
    name: str
    net: object  # FullyConnected, TwoLayer, ThreeLayerConv or ConvNet
    batch_size: int
    rule: Rule
    description: str = ""
    num_train: int = None
    warmup_steps: int = None

    @property
    def kind(self):
        return self.net.kind

    @property
    def warmup_images(self):
        """The warm-up epoch's images, or None for a whole epoch."""
        return None if self.warmup_steps is None else self.warmup_steps * self.batch_size

    def layers(self):
        return self.net.layers()

    def flops_per_step(self):
        """Matrix-product FLOPs of one training step (see the module docstring)."""
        return products_flops(self.layers(), self.batch_size)

    def forward_flops_per_image(self):
        return sum(2 * positions * fan_in * fan_out
                   for _, fan_in, fan_out, positions in self.layers())

    def train_size(self, available=NUM_TRAIN):
        """Training images an epoch draws from."""
        return available if self.num_train is None else min(self.num_train, available)

    def iterations_per_epoch(self, num_train=NUM_TRAIN):
        return max(self.train_size(num_train) // self.batch_size, 1)

    def images_per_epoch(self, num_train=NUM_TRAIN):
        return self.iterations_per_epoch(num_train) * self.batch_size

    def arrays(self, arrays):
        """The data this workload trains on, from flattened (N, 3072) arrays: the first
        train_size() training images and every validation one, shaped (N, *net.input_shape)."""
        n = self.train_size(arrays["X_train"].shape[0])
        shape = self.net.input_shape
        return {"X_train": arrays["X_train"][:n].reshape(n, *shape),
                "y_train": arrays["y_train"][:n],
                "X_val": arrays["X_val"].reshape(-1, *shape), "y_val": arrays["y_val"]}

    def solver_options(self):
        return self.rule.solver_options()

    def fastnn_model(self):
        """The fastnn model, created on the active backend, its initial weights seeded."""
        return self.net.fastnn_model()

    def torch_model(self):
        return self.net.torch_model()

    def torch_optimizer(self, model, capturable=False):
        return self.rule.torch_optimizer(self.net.torch_parameters(model), capturable)


def _by_name(*workloads):
    return {w.name: w for w in workloads}


WORKLOADS = _by_name(
    Workload("two_layer", TwoLayer((100,)), 200, Rule("adam", 1e-3),
             description="3072-100-10, batch 200, adam"),
    Workload("deep_bn", FullyConnected((1024, 1024, 1024), use_batchnorm=True, dropout=0.2), 512,
             Rule("adam", 1e-3),
             description="3072-1024-1024-1024-10, batchnorm + dropout 0.2, batch 512, adam"),
    Workload("three_layer_conv", ThreeLayerConv(hidden_dim=500, weight_scale=1e-3, reg=1e-3), 50,
             Rule("adam", 1e-3), num_train=CONV_NUM_TRAIN, warmup_steps=4,
             description="ThreeLayerConvNet(weight_scale=1e-3, hidden_dim=500, reg=1e-3): "
                         "conv 7x7x32 - relu - pool - 500 - 10, batch 50, adam 1e-3"),
    Workload("convnet", ConvNet(widths=(32, 64, 128), stem_width=24), 256,
             Rule("sgd_momentum", 1e-2), num_train=CONV_NUM_TRAIN, warmup_steps=4,
             description="ConvNet(widths=(32, 64, 128), stem_width=24), batch 256, "
                         "SGD momentum 0.9"),
    Workload("convnet_wide", ConvNet(widths=(64, 128, 128), stem_width=24), 256,
             Rule("sgd_momentum", 1e-2), num_train=CONV_NUM_TRAIN, warmup_steps=4,
             description="ConvNet(widths=(64, 128, 128), stem_width=24), batch 256, "
                         "SGD momentum 0.9"),
)


# -- data ------------------------------------------------------------------
@dataclasses.dataclass
class Dataset:
    """Host arrays (X float32 (N, 3072), y int64) and lazily made device copies."""
    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    source: str
    _on_device: dict = dataclasses.field(default_factory=dict, repr=False)

    def arrays(self, module="numpy"):
        """dict X_train, y_train, X_val, y_val as arrays of `module` ("numpy"/"cupy")."""
        host = {"X_train": self.X_train, "y_train": self.y_train,
                "X_val": self.X_val, "y_val": self.y_val}
        if module == "numpy":
            return host
        if module not in self._on_device:
            xp = importlib.import_module(module)
            self._on_device[module] = {k: xp.asarray(v) for k, v in host.items()}
        return self._on_device[module]


def cifar_root():
    """$FASTNN_DATA when it holds cifar-10-batches-py, else None."""
    root = os.environ.get("FASTNN_DATA")
    if root and os.path.isdir(os.path.join(os.path.expanduser(root), "cifar-10-batches-py")):
        return os.path.expanduser(root)
    return None


def load_data(random=False, seed=0):
    """The 49,000 / 1,000 train/val split: real CIFAR-10 when $FASTNN_DATA has it, else random."""
    root = None if random else cifar_root()
    if root is not None:
        from fastnn.data import get_cifar10_data

        d = get_cifar10_data(num_training=NUM_TRAIN, num_validation=NUM_VAL, num_test=0,
                             root=root)
        return Dataset(d["X_train"].reshape(NUM_TRAIN, -1), d["y_train"],
                       d["X_val"].reshape(NUM_VAL, -1), d["y_val"],
                       source=f"real CIFAR-10 ({root})")
    rng = np.random.default_rng(seed)
    return Dataset(rng.standard_normal((NUM_TRAIN, INPUT_DIM), dtype=np.float32),
                   rng.integers(0, NUM_CLASSES, NUM_TRAIN, dtype=np.int64),
                   rng.standard_normal((NUM_VAL, INPUT_DIM), dtype=np.float32),
                   rng.integers(0, NUM_CLASSES, NUM_VAL, dtype=np.int64),
                   source="random float32 (set FASTNN_DATA to a folder holding "
                          "cifar-10-batches-py for real CIFAR-10)")
