"""Update rules, one in-place step each (fastnn.optim.SPECS names each rule's op), and the
stack's one-pass L2 (l2_stacked_).

Each rule's reference (plain xp, declared with `update_op`: its data are w, dw
and the state tuple), then the Numba kernels, then the CuPy ones. A new rule:
its `Rule` in fastnn.optim, its reference here, and its Numba and CuPy kernels
registered against it (tests/test_kernels.py checks every SPECS op is here).
"""
import functools

import numpy as np

from fastnn.backend import get_array_module
from fastnn.kernels._numba import _jit
from fastnn.kernels import registry
from fastnn.kernels.registry import declare

# an update's data arguments: w, dw and its state (a tuple of arrays); its scalars h are not
update_op = declare(data_args=3)


# -- update rules: one in-place step each (fastnn.optim.SPECS says which) ------
# Signature: rule_(w, dw, state, h) -> None. w, dw and the state arrays
# (a tuple, in the rule's SPECS order) are a parameter of any shape, or the
# (A, K, B) blocks of K stacked members, member k owning [:, k, :]
# (fastnn.stacked). h: the rule's scalars (optim.SPECS[rule].scalars), each a
# Python float, a 0-d array or, for blocks, a (K,) array with one value per
# member (on w's device: a step's scalars need not come from the host); or h
# is one array of "scalar rows", (H,) or (K, H), column j holding scalar j
# (optim.begin_step writes them in place before a step); they
# are cast to w.dtype, as the course's Python floats are. L2 is not theirs:
# a lone model adds it in its loss, a stack with l2_stacked_ (one path).
# The formulas are the contract's, in the order of operations every
# backend's kernel repeats.
def _scalars(w, h):
    """h as w.dtype values that broadcast against w (per-member ones as (1, K, 1))."""
    xp = get_array_module(w)
    if hasattr(h, "shape"):  # scalar rows: its columns
        h = [h[..., j] for j in range(h.shape[-1])]
    out = []
    for value in h:
        if isinstance(value, (int, float)):
            out.append(w.dtype.type(value))
            continue
        value = xp.asarray(value).astype(w.dtype)
        out.append(value.reshape(1, -1, 1) if value.ndim and w.ndim == 3 else value.reshape(()))
    return out


@update_op
def sgd_(w, dw, state, h):
    (lr,) = _scalars(w, h)
    w -= dw * lr


@update_op
def sgd_momentum_(w, dw, state, h):
    (v,), (lr, momentum) = state, _scalars(w, h)
    v *= momentum
    v -= dw * lr
    w += v


@update_op
def sgd_nesterov_(w, dw, state, h):
    """v = momentum * v - lr * dw; w + momentum * v - lr * dw."""
    (v,), (lr, momentum) = state, _scalars(w, h)
    v *= momentum
    v -= dw * lr
    w += momentum * v
    w -= dw * lr


# Muon's orthogonalisation (KellerJordan/cifar10-airbench, airbench94_muon.py's
# zeropower_via_newtonschulz5): the quintic's coefficients, chosen for the steepest slope at
# zero, so a few steps take every singular value into about [0.5, 1.5]
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)
FILTER_NDIM = 4  # muon_ orthogonalises conv filters (F, C, kh, kw) as (F, C * kh * kw)


def orthogonalize(g, steps=3, eps=1e-7):
    """g (m, n) -> about U V^T of its SVD U S V^T: `steps` Newton-Schulz iterations of the
    quintic NEWTON_SCHULZ on g / |g| (Frobenius), in g's dtype (airbench94_muon's 3 steps)."""
    xp = get_array_module(g)
    a, b, c = (g.dtype.type(v) for v in NEWTON_SCHULZ)
    x = g / (xp.linalg.norm(g) + g.dtype.type(eps))
    wide = x.shape[0] <= x.shape[1]  # iterate on the smaller Gram matrix
    if not wide:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x if wide else x.T


@update_op
def muon_(w, dw, state, h):
    """Muon (airbench94_muon.py) on conv filters, Nesterov SGD on every other parameter.

    A 4-D w (F, C, kh, kw), with scalars (lr, momentum, muon_lr, muon_momentum):
    v = muon_momentum * v + dw; w *= sqrt(F) / |w|; w -= muon_lr * orthogonalize(dw +
    muon_momentum * v) (as (F, C * kh * kw)). Any other w: sgd_nesterov_ with (lr, momentum).
    """
    lr, momentum, muon_lr, muon_momentum = _scalars(w, h)
    if w.ndim != FILTER_NDIM:
        return sgd_nesterov_(w, dw, state, (lr, momentum))
    _muon_filters(w, dw, state[0], muon_lr, muon_momentum)


def _muon_filters(w, dw, v, lr, momentum):
    """Muon's step on filters w (F, ...) in place: momentum v, the weights' norm kept at
    sqrt(F), the step orthogonalised (muon_'s formula; lr, momentum of w's dtype)."""
    xp = get_array_module(w, dw)
    v *= momentum
    v += dw
    nesterov = dw + momentum * v
    w *= w.dtype.type(np.sqrt(w.shape[0])) / (xp.linalg.norm(w) + w.dtype.type(1e-30))
    w -= lr * orthogonalize(nesterov.reshape(w.shape[0], -1)).reshape(w.shape)


@update_op
def rmsprop_(w, dw, state, h):
    xp = get_array_module(w, dw)
    (cache,), (lr, decay, one_minus_decay, eps) = state, _scalars(w, h)
    cache *= decay
    cache += one_minus_decay * (dw * dw)
    w -= lr * dw / (xp.sqrt(cache) + eps)


@update_op
def adam_(w, dw, state, h):
    """Adam (and AdamW: `decay` = 1 - lr * weight_decay multiplies w first)."""
    xp = get_array_module(w, dw)
    (m, v), (lr, beta1, one_minus_beta1, beta2, one_minus_beta2, c1, c2, eps,
             decay) = state, _scalars(w, h)
    m *= beta1
    m += one_minus_beta1 * dw
    v *= beta2
    v += one_minus_beta2 * (dw * dw)
    w *= decay
    w -= lr * (m / c1) / (xp.sqrt(v / c2) + eps)


@declare(data_args=2)
def l2_stacked_(dw, w, reg):
    """L2 regularisation of K members in one pass: dw += reg_k * w in place.

    w, dw (A, K, B), member k owning [:, k, :]; reg (K,) floats. Returns the
    per-member sum(w_k ** 2) as a (K,) array of w.dtype.
    """
    xp = get_array_module(dw, w, reg)
    dw += reg.astype(w.dtype)[None, :, None] * w
    return xp.einsum("akb,akb->k", w, w)


# -- Numba (in place): one kernel per rule, over (A, K, B) blocks -----------
# A lone parameter is the one-member block (1, 1, size); the stack passes its
# members' blocks (fastnn.stacked). h (K, H) holds the rule's scalars in
# w.dtype, one row per member (cast as the reference casts them, so the
# arithmetic matches fastnn.optim's rules). The inner loop over b is contiguous and vectorises.
@_jit
def _sgd(w, dw, h):
    outer, members, inner = w.shape
    for a in range(outer):
        for k in range(members):
            lr = h[k, 0]
            for b in range(inner):
                wi, g = w[a, k, b], dw[a, k, b]
                w[a, k, b] = wi - g * lr


@_jit
def _sgd_momentum(w, dw, v, h):
    outer, members, inner = w.shape
    for a in range(outer):
        for k in range(members):
            lr, momentum = h[k, 0], h[k, 1]
            for b in range(inner):
                wi, g = w[a, k, b], dw[a, k, b]
                vi = v[a, k, b] * momentum - g * lr
                v[a, k, b] = vi
                w[a, k, b] = wi + vi


@_jit
def _sgd_nesterov(w, dw, v, h):
    outer, members, inner = w.shape
    for a in range(outer):
        for k in range(members):
            lr, momentum = h[k, 0], h[k, 1]
            for b in range(inner):
                wi, g = w[a, k, b], dw[a, k, b]
                vi = v[a, k, b] * momentum - g * lr
                v[a, k, b] = vi
                w[a, k, b] = (wi + momentum * vi) - g * lr


@_jit
def _rmsprop(w, dw, cache, h):
    outer, members, inner = w.shape
    for a in range(outer):
        for k in range(members):
            lr, decay, one_minus_decay, eps = h[k, 0], h[k, 1], h[k, 2], h[k, 3]
            for b in range(inner):
                wi, g = w[a, k, b], dw[a, k, b]
                ci = cache[a, k, b] * decay + one_minus_decay * (g * g)
                cache[a, k, b] = ci
                w[a, k, b] = wi - lr * g / (np.sqrt(ci) + eps)


@_jit
def _adam(w, dw, m, v, h):
    outer, members, inner = w.shape
    for a in range(outer):
        for k in range(members):
            lr, beta1, one_minus_beta1, beta2, one_minus_beta2 = h[k, 0], h[k, 1], h[k, 2], \
                h[k, 3], h[k, 4]
            c1, c2, eps, decay = h[k, 5], h[k, 6], h[k, 7], h[k, 8]
            for b in range(inner):
                wi, g = w[a, k, b], dw[a, k, b]
                mi = m[a, k, b] * beta1 + one_minus_beta1 * g
                vi = v[a, k, b] * beta2 + one_minus_beta2 * (g * g)
                m[a, k, b] = mi
                v[a, k, b] = vi
                # decay: adamw's decoupled weight decay (1 for adam; w * 1 is exact)
                w[a, k, b] = wi * decay - lr * (mi / c1) / (np.sqrt(vi / c2) + eps)


def _scalar_rows(h, members, dtype):
    """The rule's scalars h as a (K, len(h)) array of dtype.

    h: scalar rows ((H,) or (K, H); used as they are when they are (K, H) of
    dtype already, as optim.begin_step makes them), or a tuple of floats, 0-d
    or (K,) arrays. The casts are the reference's (dtype.type(value)).
    """
    if isinstance(h, np.ndarray):
        if h.ndim == 2 and h.shape[0] == members and h.dtype == dtype and h.flags.c_contiguous:
            return h
        return np.ascontiguousarray(np.broadcast_to(h.astype(dtype), (members, h.shape[-1])))
    if members == 1:
        try:  # floats and 0-d arrays (a (K,) array among floats makes this raise)
            rows = np.array([h], dtype=dtype)
            if rows.ndim == 2:
                return rows
        except (TypeError, ValueError):
            pass
    rows = np.empty((members, len(h)), dtype=dtype)
    for j, value in enumerate(h):
        rows[:, j] = value
    return rows


def _update_op_numba(kernel, reference_op):
    """The table op for one rule's kernel: reference_op's signature and results.

    A parameter or state array that is not C-contiguous (a transposed view,
    say) runs reference_op, which takes any strides and gives the same values.
    """
    def op(w, dw, state, h):
        if not (w.flags.c_contiguous and all(s.flags.c_contiguous for s in state)):
            return reference_op(w, dw, state, h)
        shape = w.shape if w.ndim == 3 else (1, 1, w.size)
        kernel(w.reshape(shape), np.ascontiguousarray(dw).reshape(shape),
               *(s.reshape(shape) for s in state), _scalar_rows(h, shape[1], w.dtype))

    op.__name__ = op.__qualname__ = reference_op.__name__
    op.__doc__ = reference_op.__doc__
    return op


sgd_.register("numpy")(_update_op_numba(_sgd, sgd_))
sgd_momentum_.register("numpy")(_update_op_numba(_sgd_momentum, sgd_momentum_))
sgd_nesterov_.register("numpy")(_update_op_numba(_sgd_nesterov, sgd_nesterov_))
rmsprop_.register("numpy")(_update_op_numba(_rmsprop, rmsprop_))
adam_.register("numpy")(_update_op_numba(_adam, adam_))


def _muon_op(nesterov_op):
    """muon_ on one backend: filters by the reference (its products are BLAS's, or cuBLAS's),
    every other parameter by that backend's sgd_nesterov_ op."""
    def op(w, dw, state, h):
        if w.ndim == FILTER_NDIM:
            return muon_(w, dw, state, h)
        if hasattr(h, "shape"):  # scalar rows (H,) or (K, H): the first two columns
            return nesterov_op(w, dw, state, h[..., :2])
        return nesterov_op(w, dw, state, tuple(h[:2]))

    op.__name__ = op.__qualname__ = "muon_"
    op.__doc__ = muon_.__doc__
    return op


# (without Numba, registry drops both registrations: the references run)
muon_.register("numpy")(_muon_op(registry.OPS["sgd_nesterov_"].fast.get("numpy", sgd_nesterov_)))


@_jit
def _l2_stacked(dw, w, reg, partial):
    outer, members, inner = w.shape
    for a in range(outer):
        for k in range(members):
            reg_k = reg[k]
            # partial sums per (member, column): the inner loop vectorises
            for b in range(inner):
                wi = w[a, k, b]
                dw[a, k, b] += reg_k * wi
                partial[k, b] += wi * wi


@l2_stacked_.register("numpy")
def l2_stacked_numba(dw, w, reg):
    if not (dw.flags.c_contiguous and w.flags.c_contiguous):
        return l2_stacked_(dw, w, reg)
    partial = np.zeros(w.shape[1:], dtype=w.dtype)
    _l2_stacked(dw, w, np.ascontiguousarray(reg, dtype=w.dtype), partial)
    return partial.sum(axis=1, dtype=np.float64).astype(w.dtype)


# -- CuPy: one formula per rule, the operations of the reference in its order
# g is the gradient dw; w and the state
# are read and written; the scalars are named in optim.SPECS[rule].scalars order.
_RULES = {
    "sgd": ((), ("lr",), "w = w - g * lr;"),
    "sgd_momentum": (("v",), ("lr", "momentum"), "v = v * momentum - g * lr; w = w + v;"),
    "sgd_nesterov": (("v",), ("lr", "momentum"),
                     "v = v * momentum - g * lr; w = (w + momentum * v) - g * lr;"),
    "rmsprop": (("cache",), ("lr", "decay", "one_minus_decay", "eps"),
                "cache = cache * decay + one_minus_decay * (g * g);"
                "w = w - lr * g / (sqrt(cache) + eps);"),
    "adam": (("m", "v"), ("lr", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "c1",
                          "c2", "eps", "decay"),
             "m = m * beta1 + one_minus_beta1 * g;"
             "v = v * beta2 + one_minus_beta2 * (g * g);"
             "w = w * decay - lr * (m / c1) / (sqrt(v / c2) + eps);"),
}


def rule_source(rule, on_device):
    """(in_params, out_params, operation) of rule `rule`'s ElementwiseKernel.

    on_device[j]: scalar j is read from a device array (one value, or one
    per member of (A, K, B) blocks: member k of element i is (i / inner) % K)
    rather than passed as a kernel argument.
    """
    state, names, body = _RULES[rule]
    params, reads = ["T g"], []
    for name, device in zip(names, on_device):
        if device:
            params.append(f"raw T {name}_k")
            reads.append(f"const T {name} = {name}_k[(i / inner) % {name}_k.size()];")
        else:
            params.append(f"T {name}")
    params.append("int64 inner")
    return ", ".join(params), ", ".join(f"T {n}" for n in ("w", *state)), "".join(reads) + body


@functools.lru_cache(maxsize=None)
def _rule_kernel(rule, on_device):
    import cupy

    mask = "".join("d" if d else "s" for d in on_device)
    return cupy.ElementwiseKernel(*rule_source(rule, on_device), f"fastnn_{rule}_{mask}",
                                  options=("--fmad=false",))


def _update_op_cupy(rule):
    """The table op of one rule: the reference's signature and results."""
    def op(w, dw, state, h):
        import cupy

        if hasattr(h, "shape"):  # scalar rows (H,) or (K, H): contiguous columns
            columns = cupy.ascontiguousarray(h.astype(w.dtype, copy=False).reshape(
                -1, h.shape[-1]).T)
            h = tuple(columns[j] for j in range(columns.shape[0]))
        on_device = tuple(not isinstance(v, (int, float)) for v in h)
        args = [cupy.asarray(v).astype(w.dtype, copy=False).reshape(-1) if device
                else w.dtype.type(v) for v, device in zip(h, on_device)]
        inner = w.shape[2] if w.ndim == 3 else w.size
        _rule_kernel(rule, on_device)(dw, *args, np.int64(inner), w, *state)

    op.__name__ = op.__qualname__ = f"{rule}_"
    return op


sgd_.register("cupy")(_update_op_cupy("sgd"))
sgd_momentum_.register("cupy")(_update_op_cupy("sgd_momentum"))
sgd_nesterov_.register("cupy")(_update_op_cupy("sgd_nesterov"))
rmsprop_.register("cupy")(_update_op_cupy("rmsprop"))
adam_.register("cupy")(_update_op_cupy("adam"))
muon_.register("cupy")(_muon_op(_update_op_cupy("sgd_nesterov")))
