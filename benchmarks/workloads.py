"""What the end-to-end benchmarks train, on what data, and with which contenders.

Shared by `report.py` (one process, prints a table) and `test_bench_e2e.py`
(pytest-benchmark). The measured quantity is training images per second:

    images/s = epochs * iterations_per_epoch * batch_size / seconds

where `seconds` is the wall time of `epochs` epochs of training (after one
warm-up epoch on the same model), including everything the training loop
does in them: the minibatch gather, the steps, and the accuracy checks
(1000 training samples + the 1000 validation images, after the first
iteration and at every epoch end, as `fastnn.solver.Solver.train` does).
On a GPU the device is synchronised before the clock starts and before it
stops.

The matrix-multiply ceiling is the sgemm rate of a 4096x4096x4096 float32
product (median of several, same threads). A contender's share of it is

    (FLOPs per training step / seconds per step) / sgemm rate

with FLOPs per step counting only the matrix products the step must do:
2*N*in*out per layer forward, 2*N*in*out per layer for dW, and 2*N*in*out
per layer for dX except the first layer (its input needs no gradient).
Seconds per step is the timed wall time divided by the number of steps, so
it includes the accuracy checks and everything else in the loop. A
convolution counts as a product with fan_in = C_in * kh * kw and fan_out =
C_out at each of its output positions (2 * N * positions * fan_in * fan_out
per product); the conv workloads train on a subset of the training images
per epoch (ConvWorkload.num_train) to keep a report run short.
"""
import dataclasses
import importlib
import importlib.util
import os
import platform
import statistics
import sys
import time

import numpy as np

import fastnn
import naive

NUM_TRAIN = 49000
NUM_VAL = 1000
INPUT_DIM = 3 * 32 * 32
NUM_CLASSES = 10
NUM_TRAIN_SAMPLES = 1000   # Solver's default train-accuracy subsample
CHECK_BATCH_SIZE = 128     # Solver.check_accuracy's default batch
SGEMM_N = 4096

CONTENDERS = ("fastnn-numpy", "fastnn-cupy", "naive-numpy", "naive-cupy",
              "torch-cpu", "torch-cpu-cl", "torch-cuda", "torch-cuda-graph")
GPU_CONTENDERS = ("fastnn-cupy", "naive-cupy", "torch-cuda", "torch-cuda-graph")
BASELINE = {"cpu": "naive-numpy", "gpu": "naive-cupy"}  # "ratio to naive" per device
REFERENCE = "torch-cpu"                                    # "ratio to PyTorch CPU"
# conv workloads: the ratio is to the faster of PyTorch CPU's two layouts
CONV_REFERENCES = ("torch-cpu", "torch-cpu-cl")
CONV_NUM_TRAIN = 10240     # training images per conv epoch (a subset keeps a report short)


# -- workloads -------------------------------------------------------------
def products_flops(layers, batch_size):
    """Matrix-product FLOPs of a training step over `layers` [(name, fan_in, fan_out, positions)].

    Forward, dW, and dX except for the first layer (its input needs no gradient).
    """
    total = 0
    for i, (_, fan_in, fan_out, positions) in enumerate(layers):
        products = 3 if i > 0 else 2
        total += products * 2 * batch_size * positions * fan_in * fan_out
    return total


@dataclasses.dataclass(frozen=True)
class Workload:
    """A fully connected net on flattened images, trained with adam (lr 1e-3)."""
    name: str
    hidden_dims: tuple
    batch_size: int
    use_batchnorm: bool = False
    dropout: float = 0.0
    description: str = ""
    kind = "fc"
    update_rule = "adam"
    warmup_images = None  # the warm-up is a whole epoch

    @property
    def dims(self):
        return (INPUT_DIM, *self.hidden_dims, NUM_CLASSES)

    def layers(self):
        """[(name, fan_in, fan_out, positions)] of the matrix products, input first."""
        return [(f"affine{i}", fan_in, fan_out, 1)
                for i, (fan_in, fan_out) in enumerate(zip(self.dims[:-1], self.dims[1:]), 1)]

    def train_size(self, available=NUM_TRAIN):
        """Training images an epoch draws from (all of them)."""
        return available

    def iterations_per_epoch(self, num_train=NUM_TRAIN):
        return max(self.train_size(num_train) // self.batch_size, 1)

    def images_per_epoch(self, num_train=NUM_TRAIN):
        return self.iterations_per_epoch(num_train) * self.batch_size

    def flops_per_step(self):
        """Matrix-product FLOPs of one training step (see the module docstring)."""
        return products_flops(self.layers(), self.batch_size)

    def arrays(self, arrays):
        """The data dict this workload trains on, from flattened (N, 3072) arrays."""
        return arrays

    def solver_options(self):
        return {"update_rule": self.update_rule}

    def fastnn_model(self):
        """The fastnn model, created on the active backend."""
        from fastnn.classifiers.fc_net import FullyConnectedNet, TwoLayerNet

        if self.name == "two_layer":
            return TwoLayerNet(hidden_dim=self.hidden_dims[0])
        return FullyConnectedNet(list(self.hidden_dims), use_batchnorm=self.use_batchnorm,
                                 dropout=self.dropout, seed=0)

    def weight_scale(self):
        return 1e-3 if self.name == "two_layer" else 1e-2  # the fastnn defaults

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

    def torch_optimizer(self, model, capturable=False):
        import torch

        return torch.optim.Adam(model.parameters(), lr=1e-3, capturable=capturable)


IMAGE_SHAPE = (3, 32, 32)


@dataclasses.dataclass(frozen=True)
class ConvWorkload:
    """A conv net on (N, 3, 32, 32) images; `net` is "three_layer_conv" or "convnet".

    three_layer_conv: ThreeLayerConvNet(weight_scale=1e-3, hidden_dim=500,
    reg=1e-3), adam lr 1e-3 (the course notebook's settings). convnet:
    ConvNet(widths, stem_width, seed=0) and SGD with momentum 0.9 (lr 0.01).
    PyTorch trains the same net from the same initial parameters (copied
    from fastnn's), with the same batch, data and update rule.
    """
    name: str
    net: str
    batch_size: int
    widths: tuple = ()
    stem_width: int = 0
    description: str = ""
    num_train: int = CONV_NUM_TRAIN
    kind = "conv"

    @property
    def warmup_images(self):
        """The warm-up epoch's images: 4 steps (compilation, first touch, optimizer state)."""
        return 4 * self.batch_size

    @property
    def update_rule(self):
        return "adam" if self.net == "three_layer_conv" else "sgd_momentum"

    @property
    def learning_rate(self):
        return 1e-3 if self.net == "three_layer_conv" else 1e-2

    @property
    def reg(self):
        return 1e-3 if self.net == "three_layer_conv" else 0.0

    def layers(self):
        """[(name, fan_in, fan_out, positions)]: each conv as a product per output position."""
        channels, height, width = IMAGE_SHAPE
        if self.net == "three_layer_conv":  # 7x7 conv (same size), 2x2 pool, 500 hidden
            pooled = 32 * (height // 2) * (width // 2)
            return [("conv", channels * 7 * 7, 32, height * width),
                    ("affine1", pooled, 500, 1), ("affine2", 500, NUM_CLASSES, 1)]
        layers = [("stem", channels * 9, self.stem_width, height * width)]
        c_in = self.stem_width
        for i, w in enumerate(self.widths, 1):
            layers.append((f"group{i}.conv1", c_in * 9, w, height * width))
            height, width = height // 2, width // 2  # the pool after the first conv
            layers.append((f"group{i}.conv2", w * 9, w, height * width))
            c_in = w
        return layers + [("affine", c_in, NUM_CLASSES, 1)]

    def forward_flops_per_image(self):
        return sum(2 * positions * fan_in * fan_out
                   for _, fan_in, fan_out, positions in self.layers())

    def flops_per_step(self):
        return products_flops(self.layers(), self.batch_size)

    def train_size(self, available=NUM_TRAIN):
        return min(self.num_train, available)

    def iterations_per_epoch(self, num_train=NUM_TRAIN):
        return max(self.train_size(num_train) // self.batch_size, 1)

    def images_per_epoch(self, num_train=NUM_TRAIN):
        return self.iterations_per_epoch(num_train) * self.batch_size

    def arrays(self, arrays):
        """Images (N, 3, 32, 32): the first train_size() training images, all validation ones."""
        n = self.train_size(arrays["X_train"].shape[0])
        return {"X_train": arrays["X_train"][:n].reshape(n, *IMAGE_SHAPE),
                "y_train": arrays["y_train"][:n],
                "X_val": arrays["X_val"].reshape(-1, *IMAGE_SHAPE), "y_val": arrays["y_val"]}

    def solver_options(self):
        return {"update_rule": self.update_rule,
                "optim_config": {"learning_rate": self.learning_rate}}

    def fastnn_model(self):
        """The fastnn model on the active backend, its initial weights seeded (0)."""
        from fastnn import classifiers

        if self.net == "three_layer_conv":
            state = np.random.get_state()
            np.random.seed(0)  # ThreeLayerConvNet draws from np.random, as the course's does
            try:
                return classifiers.ThreeLayerConvNet(weight_scale=1e-3, hidden_dim=500,
                                                     reg=self.reg)
            finally:
                np.random.set_state(state)
        return classifiers.ConvNet(widths=self.widths, stem_width=self.stem_width, seed=0)

    def torch_model(self):
        """The same net in PyTorch (NCHW), with fastnn's initial parameters."""
        import torch_nets

        return torch_nets.from_fastnn(self, _host_model(self))

    def torch_optimizer(self, model, capturable=False):
        """fastnn's rule: L2 (reg) on the weights only, as weight_decay; no decay on the rest."""
        import torch

        weights = [p for p in model.parameters() if p.ndim > 1]
        others = [p for p in model.parameters() if p.ndim <= 1]
        groups = [{"params": weights, "weight_decay": self.reg},
                  {"params": others, "weight_decay": 0.0}]
        if self.update_rule == "adam":
            return torch.optim.Adam(groups, lr=self.learning_rate, capturable=capturable)
        return torch.optim.SGD(groups, lr=self.learning_rate, momentum=0.9)


def _host_model(workload):
    """The fastnn model on numpy (for its initial parameters)."""
    with fastnn.use_backend("numpy"):
        return workload.fastnn_model()


WORKLOADS = {
    "two_layer": Workload("two_layer", (100,), 200,
                          description="3072-100-10, batch 200, adam"),
    "deep_bn": Workload("deep_bn", (1024, 1024, 1024), 512, use_batchnorm=True, dropout=0.2,
                        description="3072-1024-1024-1024-10, batchnorm + dropout 0.2, "
                                    "batch 512, adam"),
    "three_layer_conv": ConvWorkload(
        "three_layer_conv", "three_layer_conv", 50,
        description="ThreeLayerConvNet(weight_scale=1e-3, hidden_dim=500, reg=1e-3): "
                    "conv 7x7x32 - relu - pool - 500 - 10, batch 50, adam 1e-3"),
    "convnet": ConvWorkload(
        "convnet", "convnet", 256, widths=(32, 64, 128), stem_width=24,
        description="ConvNet(widths=(32, 64, 128), stem_width=24), batch 256, "
                    "SGD momentum 0.9"),
    "convnet_wide": ConvWorkload(
        "convnet_wide", "convnet", 256, widths=(64, 128, 128), stem_width=24,
        description="ConvNet(widths=(64, 128, 128), stem_width=24), batch 256, "
                    "SGD momentum 0.9"),
}


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


# -- what is available -------------------------------------------------------
def _gpu_reason():
    from fastnn.backend import cupy_available

    if importlib.util.find_spec("cupy") is None:
        return "CuPy is not installed (pip install 'fastnn[cuda13]' or 'fastnn[cuda12]')"
    if not cupy_available():
        return "CuPy is installed but no CUDA GPU is usable"
    return None


def _torch_reason(cuda=False):
    try:
        import torch
    except ImportError as exc:
        return f"PyTorch is not importable ({exc})"
    if cuda and not torch.cuda.is_available():
        return "PyTorch sees no CUDA GPU"
    return None


def skip_reason(contender, workload=None):
    """Why `contender` cannot run here (or cannot train `workload`), or None."""
    if contender not in CONTENDERS:
        raise ValueError(f"unknown contender {contender!r}; choose from {CONTENDERS}")
    kind = getattr(workload, "kind", None)
    if contender.startswith("naive-") and kind == "conv":
        return "no classic-style conv baseline (naive.py covers the fully connected nets)"
    if contender == "torch-cpu-cl" and kind == "fc":
        return "channels-last is an image layout: conv workloads only"
    if contender in ("fastnn-numpy", "naive-numpy"):
        return None
    if contender in ("fastnn-cupy", "naive-cupy"):
        return _gpu_reason()
    return _torch_reason(cuda=contender not in ("torch-cpu", "torch-cpu-cl"))


def device_of(contender):
    return "gpu" if contender in GPU_CONTENDERS else "cpu"


def synchronize(device):
    """Wait for queued GPU work (no-op on CPU)."""
    if device != "gpu":
        return
    if sys.modules.get("cupy") is not None:
        sys.modules["cupy"].cuda.Device().synchronize()
    if sys.modules.get("torch") is not None and sys.modules["torch"].cuda.is_initialized():
        sys.modules["torch"].cuda.synchronize()


# -- trainers: warm_up() once, then timed(epochs) -> seconds ------------------
class _Trainer:
    device = "cpu"

    def __init__(self, workload, data):
        self.workload = workload
        self.data = data

    def warm_up(self):
        """One epoch (a conv workload's: of warmup_images), untimed: compilation, first
        touch, optimizer state, graph capture."""
        self._train(1, warmup=True)
        synchronize(self.device)

    def timed(self, epochs=1):
        """Wall seconds of `epochs` epochs, the device synchronised at both ends."""
        synchronize(self.device)
        start = time.perf_counter()
        self._train(epochs)
        synchronize(self.device)
        return time.perf_counter() - start

    def prepare(self, epochs=1):
        """Untimed setup before timed(epochs) (fastnn: build the Solver)."""

    def images(self, epochs=1):
        return epochs * self.workload.images_per_epoch(self.data.X_train.shape[0])

    def arrays(self, module="numpy"):
        """The workload's training data as arrays of `module` (device copies made once)."""
        return self.workload.arrays(self.data.arrays(module))


class FastnnTrainer(_Trainer):
    """fastnn's Solver; each run is a new Solver (num_epochs=epochs) on the same model."""

    def __init__(self, workload, data, backend="numpy"):
        super().__init__(workload, data)
        self.backend = backend
        self.device = "gpu" if backend == "cupy" else "cpu"
        with fastnn.use_backend(backend):
            self.model = workload.fastnn_model()
        self.solver_data = self.arrays(backend)  # device copies made once, outside the clock
        self._solver = None
        self._runs = 0

    def prepare(self, epochs=1, warmup=False):
        from fastnn.solver import Solver

        self._runs += 1
        data = self.solver_data
        if warmup and self.workload.warmup_images:
            data = dict(data, X_train=data["X_train"][:self.workload.warmup_images],
                        y_train=data["y_train"][:self.workload.warmup_images])
        # built outside the clock: it checks the labels (a forward pass and a device read)
        self._solver = Solver(self.model, data, **self.workload.solver_options(),
                              batch_size=self.workload.batch_size, num_epochs=epochs,
                              num_train_samples=NUM_TRAIN_SAMPLES, verbose=False,
                              seed=self._runs)

    def warm_up(self):
        self.prepare(1, warmup=True)
        super().warm_up()

    def _train(self, epochs, warmup=False):
        if self._solver is None or self._solver.num_epochs != epochs:
            self.prepare(epochs, warmup)
        solver, self._solver = self._solver, None
        with fastnn.use_backend(self.backend):
            solver.train()


class NaiveTrainer(_Trainer):
    """benchmarks/naive.py: the classic-style code, with numpy or cupy as xp."""

    def __init__(self, workload, data, module="numpy"):
        super().__init__(workload, data)
        self.device = "gpu" if module == "cupy" else "cpu"
        xp = importlib.import_module(module)
        xp.random.seed(0)
        self.model = naive.NaiveNet(xp, workload.hidden_dims, dropout=workload.dropout,
                                    use_batchnorm=workload.use_batchnorm,
                                    weight_scale=workload.weight_scale())
        self.solver = naive.NaiveSolver(self.model, data.arrays(module), workload.batch_size,
                                        num_train_samples=NUM_TRAIN_SAMPLES,
                                        check_batch_size=CHECK_BATCH_SIZE)

    def _train(self, epochs, warmup=False):
        self.solver.train(epochs)


class TorchTrainer(_Trainer):
    """PyTorch: the workload's torch_model() and torch_optimizer(), eager or one CUDA graph.

    A randperm per epoch; accuracy checks as the Solver's (eval mode, no_grad,
    1000 training samples + the validation set, after the first iteration and
    at every epoch end; the best parameters are copied when val improves).
    channels_last=True: the model and every batch in torch.channels_last
    (NHWC in memory), the batch converted on the clock. With graph=True the
    whole step (forward, backward, optimizer.step with capturable Adam) is
    captured once in a CUDA graph and replayed per step, following the
    whole-network capture example in the PyTorch CUDA-graphs documentation.
    """

    def __init__(self, workload, data, device="cpu", graph=False, channels_last=False):
        super().__init__(workload, data)
        import torch
        from torch import nn

        self.torch = torch
        self.device = "gpu" if device == "cuda" else "cpu"
        self.dev = torch.device(device)
        if device == "cpu":
            torch.set_num_threads(fastnn.get_num_threads())
        torch.manual_seed(0)
        self.model = workload.torch_model().to(self.dev)
        self.memory_format = torch.channels_last if channels_last else None
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.loss_fn = nn.CrossEntropyLoss()
        self.optimizer = workload.torch_optimizer(self.model, capturable=graph)
        arrays = {k: torch.from_numpy(np.ascontiguousarray(v))
                  for k, v in self.arrays("numpy").items()}
        if device != "cpu":  # one copy to the device, outside the clock
            arrays = {k: v.to(self.dev) for k, v in arrays.items()}
        self.X_train, self.y_train = arrays["X_train"], arrays["y_train"]
        self.X_val, self.y_val = arrays["X_val"], arrays["y_val"]
        self.eval_rng = np.random.default_rng(1)
        self.losses = []
        self.best_val_acc = -1.0
        self.best_state = None
        self.graph = None
        if graph:
            self._capture()

    def _layout(self, x):
        return x if self.memory_format is None else x.contiguous(memory_format=self.memory_format)

    # -- steps
    def _eager_step(self, idx):
        x, y = self.X_train.index_select(0, idx), self.y_train.index_select(0, idx)
        x = self._layout(x)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(x), y)
        loss.backward()
        self.optimizer.step()
        self.losses.append(loss.detach())

    def _capture(self):
        torch = self.torch
        bs = self.workload.batch_size
        idx = torch.arange(bs, device=self.dev)
        self.static_x = self.X_train.index_select(0, idx)
        self.static_y = self.y_train.index_select(0, idx)
        self.model.train()
        # warm up on a side stream before capture (optimizer state, cuBLAS workspaces, ...)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self.optimizer.zero_grad(set_to_none=True)
                loss = self.loss_fn(self.model(self.static_x), self.static_y)
                loss.backward()
                self.optimizer.step()
        torch.cuda.current_stream().wait_stream(side)
        # capture: grads are set to None so backward allocates them from the graph's pool
        self.graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(self.graph):
            static_out = self.model(self.static_x)
            self.static_loss = self.loss_fn(static_out, self.static_y)
            self.static_loss.backward()
            self.optimizer.step()
        torch.cuda.synchronize()

    def _graph_step(self, idx):
        torch = self.torch
        torch.index_select(self.X_train, 0, idx, out=self.static_x)
        torch.index_select(self.y_train, 0, idx, out=self.static_y)
        self.graph.replay()
        self.losses.append(self.static_loss.detach().clone())

    # -- accuracy
    def _accuracy(self, X, y, num_samples=None):
        torch = self.torch
        n = X.shape[0]
        if num_samples is not None and n > num_samples:
            idx = torch.from_numpy(self.eval_rng.choice(n, num_samples, replace=False))
            idx = idx.to(self.dev)
            X, y, n = X.index_select(0, idx), y.index_select(0, idx), num_samples
        correct = torch.zeros((), dtype=torch.int64, device=self.dev)
        for start in range(0, n, CHECK_BATCH_SIZE):
            scores = self.model(self._layout(X[start:start + CHECK_BATCH_SIZE]))
            correct += (scores.argmax(dim=1) == y[start:start + CHECK_BATCH_SIZE]).sum()
        return correct.item() / max(n, 1)

    def _record_accuracy(self):
        torch = self.torch
        if self.losses:  # read the losses at the edges, as the Solver does
            torch.stack(self.losses).tolist()
            self.losses = []
        self.model.eval()
        with torch.no_grad():
            self._accuracy(self.X_train, self.y_train, NUM_TRAIN_SAMPLES)
            val_acc = self._accuracy(self.X_val, self.y_val)
            if val_acc > self.best_val_acc:
                self.best_val_acc = val_acc
                self.best_state = {k: v.detach().clone()
                                   for k, v in self.model.state_dict().items()}
        self.model.train()

    def _train(self, epochs, warmup=False):
        torch = self.torch
        n, bs = self.X_train.shape[0], self.workload.batch_size
        if warmup and self.workload.warmup_images:
            n = min(n, self.workload.warmup_images)
        per_epoch = self.workload.iterations_per_epoch(n)
        step = self._graph_step if self.graph is not None else self._eager_step
        self.model.train()
        for epoch in range(epochs):
            order = torch.randperm(n, device=self.dev)
            for i in range(per_epoch):
                step(order[i * bs:(i + 1) * bs])
                if (epoch == 0 and i == 0) or i == per_epoch - 1:
                    self._record_accuracy()


def make_trainer(contender, workload, data):
    """A trainer for `contender` (see CONTENDERS); raise RuntimeError when it cannot run."""
    reason = skip_reason(contender, workload)
    if reason:
        raise RuntimeError(f"{contender} cannot run here: {reason}")
    if contender.startswith("fastnn-"):
        return FastnnTrainer(workload, data, contender.split("-", 1)[1])
    if contender.startswith("naive-"):
        return NaiveTrainer(workload, data, contender.split("-", 1)[1])
    if contender in ("torch-cpu", "torch-cpu-cl"):
        return TorchTrainer(workload, data, "cpu", channels_last=contender == "torch-cpu-cl")
    return TorchTrainer(workload, data, "cuda", graph=contender == "torch-cuda-graph")


def measure(contender, workload, data, epochs=1, repeat=1, wait_quiet=0.0):
    """Warm up one epoch, then `repeat` timed runs of `epochs` epochs; a result dict.

    wait_quiet: before each timed run, wait up to this many seconds for the
    other processes to leave the CPUs (see wait_until_quiet).
    """
    trainer = make_trainer(contender, workload, data)
    trainer.warm_up()
    seconds, others = [], []
    for _ in range(repeat):
        trainer.prepare(epochs)
        if wait_quiet:
            wait_until_quiet(wait_quiet)
        with OtherLoad() as load:
            seconds.append(trainer.timed(epochs))
        others.append(load.share)
    return result(contender, workload, trainer.images(epochs), seconds, epochs,
                  data.X_train.shape[0], others)


def result(contender, workload, images, seconds, epochs, num_train=NUM_TRAIN, others=()):
    """images/s (median over repeats) and the numbers it came from."""
    rates = [images / s for s in seconds]
    steps = epochs * workload.iterations_per_epoch(num_train)
    median_s = statistics.median(seconds)
    # others: the CPU share other processes took during the median run(s), the
    # run(s) the reported number comes from
    order = sorted(range(len(seconds)), key=seconds.__getitem__)
    middle = {order[(len(order) - 1) // 2], order[len(order) // 2]}
    known = [others[i] for i in middle if i < len(others) and others[i] is not None]
    return {"contender": contender, "device": device_of(contender), "workload": workload.name,
            "images_per_s": statistics.median(rates), "images_per_s_all": rates,
            "seconds": seconds, "epochs": epochs, "images": images, "steps": steps,
            "flops_per_step": workload.flops_per_step(),
            "achieved_gflops": workload.flops_per_step() * steps / median_s / 1e9,
            "other_cpu_share": max(known) if known else None,
            "other_cpu_share_all": list(others)}


def wait_until_quiet(timeout, threshold=0.05, window=0.5):
    """Sleep until other processes use under `threshold` of the CPUs over `window` seconds.

    Gives up after `timeout` seconds; returns the last share seen (None without /proc).
    """
    deadline = time.perf_counter() + timeout
    while True:
        with OtherLoad() as load:
            time.sleep(window)
        if load.share is None or load.share < threshold or time.perf_counter() > deadline:
            return load.share


class OtherLoad:
    """Context manager: the share of all CPUs that OTHER processes (and VM steal) used inside.

    From /proc/stat (all busy time) minus this process's CPU time (os.times,
    all threads, spinning BLAS threads included); None where /proc is missing.
    A timed run with a large share measured a busy machine, not the code.
    """

    share = None

    @staticmethod
    def _busy_seconds():
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        guest = sum(fields[8:10]) if len(fields) > 9 else 0       # already in user/nice
        return (sum(fields) - idle - guest) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own_seconds():
        t = os.times()
        return t.user + t.system

    def __enter__(self):
        self._start = (time.perf_counter(), self._busy_seconds(), self._own_seconds())
        return self

    def __exit__(self, *exc):
        wall0, busy0, own0 = self._start
        wall, busy, own = time.perf_counter() - wall0, self._busy_seconds(), self._own_seconds()
        if busy0 is not None and busy is not None and wall > 0:
            others = (busy - busy0) - (own - own0)
            self.share = min(max(others / (wall * (os.cpu_count() or 1)), 0.0), 1.0)
        return False


# -- the matrix-multiply ceiling ---------------------------------------------
def _median_rate(run, n=SGEMM_N, repeats=5, sync=lambda: None):
    run()  # warm-up: thread pools, allocation, library init
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    return 2.0 * n ** 3 / statistics.median(times) / 1e9


def sgemm_rates(repeats=5, include_torch=True, include_gpu=True):
    """GFLOP/s of an n x n x n float32 product per library: {'cpu': {...}, 'gpu': {...}}."""
    n = SGEMM_N
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    c = np.empty((n, n), dtype=np.float32)
    rates = {"cpu": {"numpy": _median_rate(lambda: np.matmul(a, b, out=c), n, repeats)}, "gpu": {}}
    torch = None
    if include_torch and _torch_reason() is None:
        import torch

        torch.set_num_threads(fastnn.get_num_threads())
        ta, tb, tc = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(c)
        rates["cpu"]["torch"] = _median_rate(lambda: torch.mm(ta, tb, out=tc), n, repeats)
    if include_gpu and _gpu_reason() is None:
        import cupy

        ga, gb = cupy.asarray(a), cupy.asarray(b)
        gc = cupy.empty_like(ga)
        rates["gpu"]["cupy"] = _median_rate(lambda: cupy.matmul(ga, gb, out=gc), n, repeats,
                                            cupy.cuda.Device().synchronize)
    if include_gpu and torch is not None and torch.cuda.is_available():
        ga, gb = torch.from_numpy(a).cuda(), torch.from_numpy(b).cuda()
        gc = torch.empty_like(ga)
        rates["gpu"]["torch"] = _median_rate(lambda: torch.mm(ga, gb, out=gc), n, repeats,
                                             torch.cuda.synchronize)
    return rates


def ceiling(rates, device):
    """The fastest sgemm measured on `device` (GFLOP/s), or None."""
    values = rates.get(device, {}).values()
    return max(values) if values else None


def share_of_ceiling(res, rates):
    top = ceiling(rates, res["device"])
    return res["achieved_gflops"] / top if top else None


# -- the environment -----------------------------------------------------------
def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


BLAS_OVERRIDES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def blas_override_note(env):
    """A warning line when the environment pins OpenBLAS's kernels, else None."""
    if not env.get("blas_overrides"):
        return None
    pinned = " ".join(f"{k}={v}" for k, v in env["blas_overrides"].items())
    return (f"NOTE: {pinned} is set: OpenBLAS runs the kernels it names, not the ones it would "
            "pick for this CPU (some machines set it for old OpenBLAS builds; on an AVX-512 CPU "
            "a current numpy is about 2x faster without it). To measure a current numpy, unset "
            f"both for this command alone: env -u {' -u '.join(BLAS_OVERRIDES)} python ...")


def environment():
    """Versions, thread counts and hardware, for the report header and extra_info."""
    import numba
    from threadpoolctl import threadpool_info

    env = {"python": platform.python_version(), "fastnn": fastnn.__version__,
           "numpy": np.__version__, "numba": numba.__version__,
           "numba_threading_layer": None,
           "fastnn_threads": fastnn.get_num_threads(),
           "cpu": cpu_model(), "logical_cpus": os.cpu_count(), "gpu": None}
    try:
        env["numba_threading_layer"] = numba.threading_layer()
    except ValueError:  # no parallel region has run: fastnn's kernels are serial
        env["numba_threading_layer"] = "not started"
    env["blas"] = [{k: p.get(k) for k in ("internal_api", "version", "num_threads",
                                          "threading_layer", "architecture", "filepath")}
                   for p in threadpool_info() if p.get("user_api") == "blas"]
    env["blas_overrides"] = {k: os.environ[k] for k in BLAS_OVERRIDES if k in os.environ}
    if _torch_reason() is None:
        import torch

        env["torch"] = torch.__version__
        env["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name()
    if importlib.util.find_spec("cupy") is not None:
        try:
            import cupy

            env["cupy"] = cupy.__version__
            if _gpu_reason() is None:
                props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
                env["gpu"] = props["name"].decode() if isinstance(props["name"], bytes) \
                    else props["name"]
        except Exception as exc:  # a broken CuPy install: report it, don't fail
            env["cupy"] = f"unusable ({exc})"
    return env
