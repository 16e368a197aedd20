"""The baseline: the same nets written the classic course way, in plain NumPy (or CuPy).

This is what fastnn replaces, kept as close to the classic framework's code
as a fair comparison allows: layers are functions returning caches, the
minibatch is drawn with `random.choice` (with replacement), relu is
`maximum`, dropout draws a boolean mask from `random.rand`, batchnorm and
softmax are written out, and adam is the functional rule that returns new
arrays. The first layer's input gradient is computed too, as the classic
backward pass does.

Two departures, both in the baseline's favour so that the ratios are not
inflated: the dropout mask is cast to the input dtype (the classic code casts
the forward output, but its float64 mask then turns the backward pass and
the parameters into float64), and with reg = 0 the L2 term is skipped.

Everything takes its array module `xp` (numpy or cupy) explicitly.
"""
import numpy as np


# -- layers ---------------------------------------------------------------
def affine_forward(x, w, b):
    out = x.reshape(x.shape[0], -1).dot(w) + b
    return out, (x, w, b)


def affine_backward(dout, cache):
    x, w, b = cache
    dx = dout.dot(w.T).reshape(x.shape)
    dw = x.reshape(x.shape[0], -1).T.dot(dout)
    db = dout.sum(axis=0)
    return dx, dw, db


def relu_forward(xp, x):
    return xp.maximum(0, x), x


def relu_backward(dout, cache):
    x = cache
    return dout * (x > 0)


def batchnorm_forward(xp, x, gamma, beta, bn_param):
    mode = bn_param["mode"]
    eps = bn_param.get("eps", 1e-5)
    momentum = bn_param.get("momentum", 0.9)
    running_mean = bn_param.get("running_mean", xp.zeros(x.shape[1], dtype=x.dtype))
    running_var = bn_param.get("running_var", xp.zeros(x.shape[1], dtype=x.dtype))
    cache = None
    if mode == "train":
        mu = x.mean(axis=0)
        xmu = x - mu
        var = (xmu ** 2).mean(axis=0)
        ivar = 1.0 / xp.sqrt(var + eps)
        xhat = xmu * ivar
        out = gamma * xhat + beta
        running_mean = momentum * running_mean + (1 - momentum) * mu
        running_var = momentum * running_var + (1 - momentum) * var
        cache = (xhat, gamma, ivar)
    else:
        xhat = (x - running_mean) / xp.sqrt(running_var + eps)
        out = gamma * xhat + beta
    bn_param["running_mean"] = running_mean
    bn_param["running_var"] = running_var
    return out, cache


def batchnorm_backward(dout, cache):
    xhat, gamma, ivar = cache
    n = dout.shape[0]
    dbeta = dout.sum(axis=0)
    dgamma = (dout * xhat).sum(axis=0)
    dxhat = dout * gamma
    dx = (1.0 / n) * ivar * (n * dxhat - dxhat.sum(axis=0) - xhat * (dxhat * xhat).sum(axis=0))
    return dx, dgamma, dbeta


def dropout_forward(xp, x, dropout_param):
    keep = 1.0 - dropout_param["p"]
    if dropout_param["mode"] != "train":
        return x, None
    # cast: see the module docstring
    mask = ((xp.random.rand(*x.shape) < keep) / keep).astype(x.dtype)
    out = x * mask
    return out.astype(x.dtype, copy=False), mask


def dropout_backward(dout, cache):
    mask = cache
    return dout if mask is None else dout * mask


def softmax_loss(xp, x, y):
    shifted = x - xp.max(x, axis=1, keepdims=True)
    z = xp.sum(xp.exp(shifted), axis=1, keepdims=True)
    log_probs = shifted - xp.log(z)
    probs = xp.exp(log_probs)
    n = x.shape[0]
    loss = -xp.sum(log_probs[xp.arange(n), y]) / n
    dx = probs.copy()
    dx[xp.arange(n), y] -= 1
    dx /= n
    return loss, dx


# -- update rule ----------------------------------------------------------
def adam(xp, w, dw, config=None):
    if config is None:
        config = {}
    config.setdefault("learning_rate", 1e-3)
    config.setdefault("beta1", 0.9)
    config.setdefault("beta2", 0.999)
    config.setdefault("epsilon", 1e-8)
    config.setdefault("m", xp.zeros_like(w))
    config.setdefault("v", xp.zeros_like(w))
    config.setdefault("t", 0)
    config["t"] += 1
    b1, b2 = config["beta1"], config["beta2"]
    config["m"] = b1 * config["m"] + (1 - b1) * dw
    config["v"] = b2 * config["v"] + (1 - b2) * (dw ** 2)
    mb = config["m"] / (1 - b1 ** config["t"])
    vb = config["v"] / (1 - b2 ** config["t"])
    next_w = w - config["learning_rate"] * mb / (xp.sqrt(vb) + config["epsilon"])
    return next_w, config


# -- the net --------------------------------------------------------------
class NaiveNet:
    """{affine - [batchnorm] - relu - [dropout]} x (L - 1) - affine - softmax, classic style.

    With one hidden layer, no batchnorm and no dropout this is TwoLayerNet.
    """

    def __init__(self, xp, hidden_dims, input_dim=3 * 32 * 32, num_classes=10, dropout=0.0,
                 use_batchnorm=False, weight_scale=1e-2, dtype=np.float32, seed=0):
        self.xp = xp
        self.dtype = np.dtype(dtype)
        self.use_batchnorm = use_batchnorm
        self.num_layers = len(hidden_dims) + 1
        rng = np.random.RandomState(seed)
        dims = [input_dim, *hidden_dims, num_classes]
        self.params = {}
        for i in range(1, self.num_layers + 1):
            w = weight_scale * rng.randn(dims[i - 1], dims[i])
            self.params[f"W{i}"] = xp.asarray(w.astype(self.dtype))
            self.params[f"b{i}"] = xp.zeros(dims[i], dtype=self.dtype)
            if use_batchnorm and i < self.num_layers:
                self.params[f"gamma{i}"] = xp.ones(dims[i], dtype=self.dtype)
                self.params[f"beta{i}"] = xp.zeros(dims[i], dtype=self.dtype)
        self.dropout_param = {"mode": "train", "p": dropout} if dropout > 0 else None
        self.bn_params = [{"mode": "train"} for _ in hidden_dims] if use_batchnorm else []

    def loss(self, X, y=None):
        xp, p = self.xp, self.params
        X = X.astype(self.dtype)
        mode = "test" if y is None else "train"
        if self.dropout_param is not None:
            self.dropout_param["mode"] = mode
        for bn_param in self.bn_params:
            bn_param["mode"] = mode
        caches = []
        h = X
        for i in range(1, self.num_layers):
            h, fc_cache = affine_forward(h, p[f"W{i}"], p[f"b{i}"])
            bn_cache = drop_cache = None
            if self.use_batchnorm:
                h, bn_cache = batchnorm_forward(xp, h, p[f"gamma{i}"], p[f"beta{i}"],
                                                self.bn_params[i - 1])
            h, relu_cache = relu_forward(xp, h)
            if self.dropout_param is not None:
                h, drop_cache = dropout_forward(xp, h, self.dropout_param)
            caches.append((fc_cache, bn_cache, relu_cache, drop_cache))
        L = self.num_layers
        scores, last_cache = affine_forward(h, p[f"W{L}"], p[f"b{L}"])
        if mode == "test":
            return scores

        grads = {}
        loss, dscores = softmax_loss(xp, scores, y)
        dh, grads[f"W{L}"], grads[f"b{L}"] = affine_backward(dscores, last_cache)
        for i in range(L - 1, 0, -1):
            fc_cache, bn_cache, relu_cache, drop_cache = caches[i - 1]
            dh = dropout_backward(dh, drop_cache)
            dh = relu_backward(dh, relu_cache)
            if self.use_batchnorm:
                dh, grads[f"gamma{i}"], grads[f"beta{i}"] = batchnorm_backward(dh, bn_cache)
            dh, grads[f"W{i}"], grads[f"b{i}"] = affine_backward(dh, fc_cache)
        return loss, grads


# -- the solver -----------------------------------------------------------
class NaiveSolver:
    """The classic Solver loop: random.choice minibatches, functional adam, float(loss).

    `train(num_epochs)` measures accuracy where fastnn's Solver.train does:
    after the first iteration and at every epoch end.
    """

    def __init__(self, model, data, batch_size, num_train_samples=1000, check_batch_size=128):
        self.xp = xp = model.xp
        self.model = model
        self.X_train, self.y_train = xp.asarray(data["X_train"]), xp.asarray(data["y_train"])
        self.X_val, self.y_val = xp.asarray(data["X_val"]), xp.asarray(data["y_val"])
        self.batch_size = batch_size
        self.num_train_samples = num_train_samples
        self.check_batch_size = check_batch_size
        self.optim_configs = {p: {} for p in model.params}
        self.loss_history, self.train_acc_history, self.val_acc_history = [], [], []
        self.best_val_acc = 0.0
        self.best_params = {}

    @property
    def iterations_per_epoch(self):
        return max(self.X_train.shape[0] // self.batch_size, 1)

    def _step(self):
        xp = self.xp
        num_train = self.X_train.shape[0]
        batch_mask = xp.random.choice(num_train, self.batch_size)
        X_batch = self.X_train[batch_mask]
        y_batch = self.y_train[batch_mask]
        loss, grads = self.model.loss(X_batch, y_batch)
        self.loss_history.append(float(loss))
        for p, w in self.model.params.items():
            next_w, next_config = adam(xp, w, grads[p], self.optim_configs[p])
            self.model.params[p] = next_w
            self.optim_configs[p] = next_config

    def check_accuracy(self, X, y, num_samples=None):
        xp = self.xp
        N = X.shape[0]
        if num_samples is not None and N > num_samples:
            mask = xp.random.choice(N, num_samples)
            N = num_samples
            X = X[mask]
            y = y[mask]
        batch_size = self.check_batch_size
        num_batches = (N + batch_size - 1) // batch_size
        y_pred = []
        for i in range(num_batches):
            start, end = i * batch_size, (i + 1) * batch_size
            scores = self.model.loss(X[start:end])
            y_pred.append(xp.argmax(scores, axis=1))
        y_pred = xp.hstack(y_pred)
        return float(xp.mean(y_pred == y))

    def _record_accuracy(self):
        train_acc = self.check_accuracy(self.X_train, self.y_train,
                                        num_samples=self.num_train_samples)
        val_acc = self.check_accuracy(self.X_val, self.y_val)
        self.train_acc_history.append(train_acc)
        self.val_acc_history.append(val_acc)
        if val_acc > self.best_val_acc or not self.best_params:
            self.best_val_acc = val_acc
            self.best_params = {k: v.copy() for k, v in self.model.params.items()}

    def train(self, num_epochs=1):
        per_epoch = self.iterations_per_epoch
        for epoch in range(num_epochs):
            for i in range(per_epoch):
                self._step()
                if (epoch == 0 and i == 0) or i == per_epoch - 1:
                    self._record_accuracy()
        self.model.params = self.best_params
