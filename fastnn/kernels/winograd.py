"""Winograd F(2x2, 3x3): the Numba kernels of the 3x3 stride-1 pad-1 convolutions (conv.py's
conv_forward and conv_backward on numpy) and of their fusion with a 2x2 max pool (pool.py).

There is no separate op here: these are the numpy versions' insides, tested
against the reference conv and pool (tests/test_kernels.py).
"""
import numpy as np

from fastnn.kernels import _numba
from fastnn.kernels._numba import _jit, _run_chunks


# -- Winograd F(2x2, 3x3) ------------------------------------------------------
# A 3x3 convolution with stride 1 and pad 1 (every conv of ConvNet after its
# stem) as Lavin and Gray's F(2x2, 3x3): each 2x2 output tile is
# A^T [(G g G^T) * (B^T d B)] A of its 4x4 input tile d, so the products take
# 16 multiplies per tile and channel pair instead of 36 (2.25x fewer), as 16
# matrix products (tiles x C) @ (C x F) per chunk of images. The transforms
# are adds only and run channel-vectorised on tile-major (tiles, 16, C)
# arrays; the products read those through strided views. The backward pass
# uses the same tiles: dx is the forward transform of dout with the filters
# rotated and transposed, and the filters' gradient is G^T [sum over tiles of
# (B^T d B)^T (A dy A^T)] G. A narrow input (the stem's 3 channels) gives
# products too thin to pay for the transforms: im2col stays there.
WINOGRAD_MIN_CHANNELS = 8
# A plain conv whose output is smaller than this either way stays on im2col too: a 3x3
# output's 2x2 tiles make 16 values for 9, with thin products (im2col measured 1.3-1.6x
# faster at 128 and 256 channels, 3x3, batch 256; Winograd 1.3x faster at 4x4). A conv
# fused with a 2x2 pool makes only the pool's windows, so it takes Winograd at any size.
WINOGRAD_MIN_SIZE = 4


def _winograd_fits(w_shape, stride, pad, out_size=None):
    """Whether Winograd F(2x2, 3x3) takes a conv of filters w_shape; out_size: its output
    (H', W') for a plain conv (none: a conv fused with its pool)."""
    filters, channels, filter_height, filter_width = w_shape
    return (filter_height, filter_width, stride, pad) == (3, 3, 1, 1) and min(
        channels, filters) >= WINOGRAD_MIN_CHANNELS and (
            out_size is None or min(out_size) >= WINOGRAD_MIN_SIZE)


@_jit
def _fill_padded(x, argmax, image, padded):
    """padded[1:H+1, 1:W+1] = x[image] (n, H, W, C); the border stays as it is (zero).

    With argmax (not None), x is the gradient of a 2x2 stride-2 max pool instead,
    (n, H/2, W/2, C): each value goes to its window's argmax tap, zeros to the rest.
    """
    if argmax is None:
        padded[1:x.shape[1] + 1, 1:x.shape[2] + 1, :] = x[image]
        return
    for py in range(x.shape[1]):
        top, below = padded[2 * py + 1], padded[2 * py + 2]
        for px in range(x.shape[2]):
            left = 2 * px + 1
            for c in range(x.shape[3]):
                tap, g = argmax[image, py, px, c], x[image, py, px, c]
                top[left, c] = g if tap == 0 else 0
                top[left + 1, c] = g if tap == 1 else 0
                below[left, c] = g if tap == 2 else 0
                below[left + 1, c] = g if tap == 3 else 0


@_jit
def _winograd_input(x, argmax, start, stop, padded, v):
    """v (tiles, 16, C): B^T d B of every 4x4 tile d (pad 1) of images [start, stop) of
    x (n, H, W, C) (or of a max pool's gradient: see _fill_padded), tile by tile in
    row-major order.

    padded (2 * tiles_y + 2, 2 * tiles_x + 2, C) must be zero outside [1:H+1, 1:W+1]
    (only that part is written here).
    """
    channels = x.shape[3]
    tiles_y, tiles_x = (padded.shape[0] - 2) // 2, (padded.shape[1] - 2) // 2
    t = 0
    for image in range(start, stop):
        _fill_padded(x, argmax, image, padded)
        for ty in range(tiles_y):
            for tx in range(tiles_x):
                x0 = 2 * tx
                vt = v[t]
                for i in range(4):  # each row of d times B
                    row = padded[2 * ty + i]
                    for c in range(channels):
                        d0, d1, d2, d3 = row[x0, c], row[x0 + 1, c], row[x0 + 2, c], row[x0 + 3, c]
                        vt[4 * i, c] = d0 - d2
                        vt[4 * i + 1, c] = d1 + d2
                        vt[4 * i + 2, c] = d2 - d1
                        vt[4 * i + 3, c] = d1 - d3
                for j in range(4):  # then B^T times each column, in place
                    for c in range(channels):
                        a0, a1, a2, a3 = vt[j, c], vt[4 + j, c], vt[8 + j, c], vt[12 + j, c]
                        vt[j, c] = a0 - a2
                        vt[4 + j, c] = a1 + a2
                        vt[8 + j, c] = a2 - a1
                        vt[12 + j, c] = a1 - a3
                t += 1


@_jit
def _rows_times_a(mt):
    """Each row of one tile's m (16, F) as 4x4 rows times A, in place into the row's
    first two slots: the first half of A^T m A."""
    for i in range(4):
        for f in range(mt.shape[1]):
            m0, m1, m2, m3 = mt[4 * i, f], mt[4 * i + 1, f], mt[4 * i + 2, f], mt[4 * i + 3, f]
            mt[4 * i, f] = m0 + m1 + m2
            mt[4 * i + 1, f] = m1 - m2 - m3


@_jit
def _winograd_output(m, start, stop, bias, out):
    """out (n, H, W, F) of images [start, stop): A^T m A + bias of each tile's m (16, F)
    in m (tiles, 16, F), which is overwritten."""
    height, width, filters = out.shape[1], out.shape[2], out.shape[3]
    tiles_y, tiles_x = (height + 1) // 2, (width + 1) // 2
    t = 0
    for image in range(start, stop):
        for ty in range(tiles_y):
            for tx in range(tiles_x):
                mt = m[t]
                _rows_times_a(mt)
                y0, x0 = 2 * ty, 2 * tx
                for j in range(2):  # then A^T times those two columns
                    if x0 + j >= width:  # the odd edge: a tile half outside the image
                        continue
                    top = out[image, y0, x0 + j]
                    for f in range(filters):
                        top[f] = mt[j, f] + mt[4 + j, f] + mt[8 + j, f] + bias[f]
                    if y0 + 1 < height:
                        below = out[image, y0 + 1, x0 + j]
                        for f in range(filters):
                            below[f] = mt[4 + j, f] - mt[8 + j, f] - mt[12 + j, f] + bias[f]
                t += 1


@_jit
def _takes_over(v, best):
    """Whether a later tap v replaces a window's best so far: strictly greater (ties keep the
    first tap, row-major), or the window's first NaN, which then stays: np.argmax's rule, so
    a window holding NaN pools to NaN with its gradient to that NaN, as in the reference."""
    # `not v <= best` is true for a greater v and for a NaN v; `best == best` keeps a NaN
    # best. This form measured as fast as the plain `v > best` (`v > best or ...` was ~8% slower)
    return not v <= best and best == best


@_jit
def _winograd_output_pool(m, start, stop, bias, pooled, argmax):
    """As _winograd_output, then a 2x2 stride-2 max pool of each tile (its window):
    pooled and argmax (n, H // 2, W // 2, F) get each window's max and first tap (row-major).

    m holds the tiles of the pool's windows only (H // 2 by W // 2 per image): an odd
    conv output's last row and column, which the pool drops, are never made.
    """
    tiles_y, tiles_x, filters = pooled.shape[1], pooled.shape[2], pooled.shape[3]
    t = 0
    for image in range(start, stop):
        for ty in range(tiles_y):
            for tx in range(tiles_x):
                mt = m[t]
                _rows_times_a(mt)
                out, taps = pooled[image, ty, tx], argmax[image, ty, tx]
                for f in range(filters):
                    best, tap = mt[0, f] + mt[4, f] + mt[8, f] + bias[f], 0
                    v = mt[1, f] + mt[5, f] + mt[9, f] + bias[f]
                    if _takes_over(v, best):  # the pool's rule: first maximum, or first NaN
                        best, tap = v, 1
                    v = mt[4, f] - mt[8, f] - mt[12, f] + bias[f]
                    if _takes_over(v, best):
                        best, tap = v, 2
                    v = mt[5, f] - mt[9, f] - mt[13, f] + bias[f]
                    if _takes_over(v, best):
                        best, tap = v, 3
                    out[f] = best
                    taps[f] = tap
                t += 1


@_jit
def _winograd_output_grad(dout, argmax, start, stop, padded, e):
    """e (tiles, 16, F): A dy A^T of every 2x2 tile dy of images [start, stop) of
    dout (n, H, W, F) (or of a max pool's gradient: see _fill_padded), zero beyond
    the image: the gradient of each tile's m. padded is as for _winograd_input.
    """
    filters = dout.shape[3]
    tiles_y, tiles_x = (padded.shape[0] - 2) // 2, (padded.shape[1] - 2) // 2
    t = 0
    for image in range(start, stop):
        _fill_padded(dout, argmax, image, padded)
        for ty in range(tiles_y):
            for tx in range(tiles_x):
                x0 = 2 * tx + 1
                et = e[t]
                for i in range(2):  # each row of dy times A^T: (p, q) -> (p, p + q, p - q, -q)
                    row = padded[2 * ty + 1 + i]
                    for f in range(filters):
                        p, q = row[x0, f], row[x0 + 1, f]
                        et[4 * i, f] = p
                        et[4 * i + 1, f] = p + q
                        et[4 * i + 2, f] = p - q
                        et[4 * i + 3, f] = -q
                for j in range(4):  # then A times each column: (z0, z1) -> (z0, z0 + z1, z0 - z1, -z1)
                    for f in range(filters):
                        z0, z1 = et[j, f], et[4 + j, f]
                        et[4 + j, f] = z0 + z1
                        et[8 + j, f] = z0 - z1
                        et[12 + j, f] = -z1
                t += 1


def _g_times(a):
    """G @ a over a's first axis, (3, ...) -> (4, ...): G's rows (1 0 0), (1 1 1)/2, (1 -1 1)/2, (0 0 1)."""
    half = a.dtype.type(0.5)
    outer = (a[0] + a[2]) * half
    return np.stack([a[0], outer + a[1] * half, outer - a[1] * half, a[2]])


def _g_transposed_times(a):
    """G^T @ a over a's first axis, (4, ...) -> (3, ...)."""
    half = a.dtype.type(0.5)
    both, diff = (a[1] + a[2]) * half, (a[1] - a[2]) * half
    return np.stack([a[0] + both, diff, both + a[3]])


def _winograd_filters(w_mat, flip=False):
    """w_mat (9C, F), taps (i, j, c) -> U (16, C, F): G g G^T of each (c, f) filter.

    flip: the input gradient's filters instead (rotated 180 degrees, C and F swapped): (16, F, C).
    """
    g = w_mat.reshape(3, 3, -1, w_mat.shape[1])
    if flip:
        g = g[::-1, ::-1].transpose(0, 1, 3, 2)
    u = _g_times(_g_times(g).swapaxes(0, 1)).swapaxes(0, 1)  # (4, 4, C, F)
    return np.ascontiguousarray(u.reshape(16, *u.shape[2:]))


def _winograd_filter_grad(du):
    """du (16, C, F), the gradient of U -> the filters' gradient (9C, F), taps (i, j, c)."""
    dg = du.reshape(4, 4, *du.shape[1:])
    dg = _g_transposed_times(_g_transposed_times(dg).swapaxes(0, 1)).swapaxes(0, 1)
    return np.ascontiguousarray(dg.reshape(-1, du.shape[2]))


def _winograd_geometry(x_nhwc, widths, pooled=False):
    """(tiles_y, tiles_x, tiles per image, images per chunk): a chunk's transformed tiles of
    all `widths` channel counts within CONV_CHUNK_BYTES (_numba.py).

    pooled: the tiles of a following 2x2 stride-2 pool's windows only (H // 2 by W // 2:
    an odd size's last row or column is dropped by the pool); else all (H + 1) // 2 by
    (W + 1) // 2, an odd size's last tiles half outside the image. The chunk is sized
    for all tiles either way (the backward's input gradient needs them).
    """
    n, height, width = x_nhwc.shape[:3]
    tiles_y, tiles_x = (height + 1) // 2, (width + 1) // 2
    per_image = 16 * tiles_y * tiles_x * sum(widths) * x_nhwc.itemsize
    if pooled:
        tiles_y, tiles_x = height // 2, width // 2
    step = max(1, min(n, _numba.CONV_CHUNK_BYTES // per_image))
    return tiles_y, tiles_x, tiles_y * tiles_x, step


def _winograd_forward(x_nhwc, w_mat, bias, pool=False):
    """x_nhwc (n, H, W, C), w_mat (9C, F), bias (F,) or None -> out (n, H, W, F).

    pool: each 2x2 output tile max-pooled on the spot instead -> (pooled, argmax), both
    (n, H // 2, W // 2, F): the full-size output is never written (nor, for an odd H or
    W, the last row or column the pool drops).
    """
    n, height, width, channels = x_nhwc.shape
    filters, dtype = w_mat.shape[1], x_nhwc.dtype
    tiles_y, tiles_x, tiles, step = _winograd_geometry(x_nhwc, (channels, filters), pool)
    u = _winograd_filters(w_mat)
    bias = np.zeros(filters, dtype) if bias is None else bias
    if pool:
        out = np.empty((n, tiles_y, tiles_x, filters), dtype=dtype)
        argmax = np.empty(out.shape, dtype=np.uint8)
    else:
        out = np.empty((n, height, width, filters), dtype=dtype)
    buffers = {}

    def work(start, stop, worker):
        if worker not in buffers:
            buffers[worker] = (np.zeros((2 * tiles_y + 2, 2 * tiles_x + 2, channels), dtype),
                               np.empty((step * tiles, 16, channels), dtype),
                               np.empty((step * tiles, 16, filters), dtype))
        padded, v, m = buffers[worker]
        count = (stop - start) * tiles
        v, m = v[:count], m[:count]
        _winograd_input(x_nhwc, None, start, stop, padded, v)
        np.matmul(v.transpose(1, 0, 2), u, out=m.transpose(1, 0, 2))
        if pool:
            _winograd_output_pool(m, start, stop, bias, out, argmax)
        else:
            _winograd_output(m, start, stop, bias, out)

    _run_chunks(work, n, step)
    return (out, argmax) if pool else out


def _winograd_backward(dout_nhwc, x_nhwc, w_mat, need_dx, has_bias, argmax=None):
    """-> (dx (n, H, W, C) or None, dw_mat (9C, F), db (F,) or None).

    argmax (n, H // 2, W // 2, F): dout_nhwc is the gradient of the output's 2x2 max pool
    (_winograd_forward with pool), unpooled tile by tile. The filters' gradient then
    takes the pool's windows' tiles only; the input gradient takes all tiles (an odd
    size's last input row still feeds the row above it).
    """
    n, height, width, channels = x_nhwc.shape
    filters, dtype = w_mat.shape[1], x_nhwc.dtype
    widths = (channels, filters)
    tiles_y, tiles_x, tiles, step = _winograd_geometry(x_nhwc, widths)
    dw_tiles_y, dw_tiles_x, dw_tiles, _ = _winograd_geometry(x_nhwc, widths, argmax is not None)
    u_flipped = _winograd_filters(w_mat, flip=True) if need_dx else None
    dx = np.empty_like(x_nhwc) if need_dx else None
    no_bias = np.zeros(channels, dtype)
    dout_pixels = dout_nhwc.shape[1] * dout_nhwc.shape[2]
    dout_rows = dout_nhwc.reshape(n * dout_pixels, filters)
    partial = {}  # worker -> its buffers and partial sums

    def work(start, stop, worker):
        s = partial.get(worker)
        if s is None:
            padded = (2 * tiles_y + 2, 2 * tiles_x + 2)
            dw_padded = (2 * dw_tiles_y + 2, 2 * dw_tiles_x + 2)
            s = partial[worker] = dict(
                du=np.zeros((16, channels, filters), dtype), db=np.zeros(filters, dtype),
                du_chunk=np.empty((16, channels, filters), dtype),
                padded_x=np.zeros(dw_padded + (channels,), dtype),
                padded_dout=np.zeros(dw_padded + (filters,), dtype),
                v=np.empty((step * tiles, 16, channels), dtype),
                e=np.empty((step * tiles, 16, filters), dtype))
            s["padded_dout_dx"] = (s["padded_dout"] if padded == dw_padded
                                   else np.zeros(padded + (filters,), dtype))
        count = (stop - start) * dw_tiles
        v, e = s["v"][:count], s["e"][:count]
        _winograd_input(x_nhwc, None, start, stop, s["padded_x"], v)
        _winograd_output_grad(dout_nhwc, argmax, start, stop, s["padded_dout"], e)
        np.matmul(v.transpose(1, 2, 0), e.transpose(1, 0, 2), out=s["du_chunk"])
        s["du"] += s["du_chunk"]
        if has_bias:  # (a pool's gradient has the same sum as the unpooled one)
            s["db"] += dout_rows[start * dout_pixels:stop * dout_pixels].sum(axis=0)
        if need_dx:  # into the same buffers (their tiles are used up): less cache in use
            count = (stop - start) * tiles
            v_dout, m_dx = s["e"][:count], s["v"][:count]
            _winograd_input(dout_nhwc, argmax, start, stop, s["padded_dout_dx"], v_dout)
            np.matmul(v_dout.transpose(1, 0, 2), u_flipped, out=m_dx.transpose(1, 0, 2))
            _winograd_output(m_dx, start, stop, no_bias, dx)

    _run_chunks(work, n, step)
    states = [partial[worker] for worker in sorted(partial)]
    du, db = states[0]["du"], states[0]["db"]
    for s in states[1:]:  # the workers' partial sums, in worker order (deterministic)
        du += s["du"]
        db += s["db"]
    return dx, _winograd_filter_grad(du), (db if has_bias else None)
