"""Who trains a workload: the contenders (fastnn, the naive baseline, PyTorch) and their timing.

The measured quantity is training images per second:

    images/s = epochs * iterations_per_epoch * batch_size / seconds

where `seconds` is the wall time of `epochs` epochs of training (after one
warm-up epoch on the same model), including everything the training loop
does in them: the minibatch gather, the steps, and the accuracy checks
(1000 training samples + the 1000 validation images, after the first
iteration and at every epoch end, as `fastnn.solver.Solver.train` does).
On a GPU the device is synchronised before the clock starts and before it
stops. Seconds per step (for the share of the sgemm ceiling, machine.py) is
the timed wall time divided by the number of steps, so it includes the
accuracy checks and everything else in the loop.

A trainer is made by make_trainer(contender, workload, data); it reads only
the workload's declared parts (its net, rule, batch, data shape).
"""
import importlib
import statistics
import time

import numpy as np

import fastnn
import machine
import naive
from workloads import CHECK_BATCH_SIZE, NUM_TRAIN, NUM_TRAIN_SAMPLES

CONTENDERS = ("fastnn-numpy", "fastnn-cupy", "naive-numpy", "naive-cupy",
              "torch-cpu", "torch-cpu-cl", "torch-cuda", "torch-cuda-graph")
GPU_CONTENDERS = ("fastnn-cupy", "naive-cupy", "torch-cuda", "torch-cuda-graph")
BASELINE = {"cpu": "naive-numpy", "gpu": "naive-cupy"}  # "ratio to naive" per device
REFERENCE = "torch-cpu"                                    # "ratio to PyTorch CPU"
# conv workloads: the ratio is to the faster of PyTorch CPU's two layouts
CONV_REFERENCES = ("torch-cpu", "torch-cpu-cl")


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
        return machine.gpu_reason()
    return machine.torch_reason(cuda=contender not in ("torch-cpu", "torch-cpu-cl"))


def device_of(contender):
    return "gpu" if contender in GPU_CONTENDERS else "cpu"


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
        machine.synchronize(self.device)

    def timed(self, epochs=1):
        """Wall seconds of `epochs` epochs, the device synchronised at both ends."""
        machine.synchronize(self.device)
        start = time.perf_counter()
        self._train(epochs)
        machine.synchronize(self.device)
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
        net = workload.net
        self.model = naive.NaiveNet(xp, net.hidden_dims, dropout=net.dropout,
                                    use_batchnorm=net.use_batchnorm, weight_scale=net.weight_scale)
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
    other processes to leave the CPUs (machine.wait_until_quiet).
    """
    trainer = make_trainer(contender, workload, data)
    trainer.warm_up()
    seconds, others = [], []
    for _ in range(repeat):
        trainer.prepare(epochs)
        if wait_quiet:
            machine.wait_until_quiet(wait_quiet)
        with machine.OtherLoad() as load:
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
