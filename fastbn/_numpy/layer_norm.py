"""LayerNorm and RMSNorm reference: two-pass statistics in float64, block by block.

Both take the (rows, D) view of the input: each row is normalized on its own.
RMSNorm is LayerNorm without centring (the mean is taken to be 0) and without bias.

The float64 copies are made one block of rows (or of one long row) at a time, so
the temporaries stay the size of a block however long a row is: one row of 2^27
values costs a few MB beyond the arrays themselves, not several times the input.
Each block is read in full before its part of the output is written, so an output
that is exactly its input (out=x, out=grad_out) is updated in place correctly.
"""
import numpy as np

# Values per block: the float64 temporaries are a small multiple of this.
BLOCK_VALUES = 1 << 15


def _blocks(rows, D):
    """(row slice, column slice) pieces of the (rows, D) matrix, about BLOCK_VALUES each,
    in row-major order: blocks of whole rows, or consecutive pieces of one long row."""
    if D >= BLOCK_VALUES:
        for r in range(rows):
            for c0 in range(0, D, BLOCK_VALUES):
                yield slice(r, r + 1), slice(c0, c0 + BLOCK_VALUES)
    else:
        step = BLOCK_VALUES // max(D, 1)
        for r0 in range(0, rows, step):
            yield slice(r0, r0 + step), slice(None)


def _column(a, columns):
    """a[columns] as float64, or None for a missing parameter."""
    return None if a is None else a[columns].astype(np.float64)


def _forward(x, weight, bias, eps, centred, y, mean, rstd):
    rows, D = x.shape
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        row_mean = np.zeros(rows)
        if centred:
            for r, c in _blocks(rows, D):
                row_mean[r] += x[r, c].sum(axis=1, dtype=np.float64)
            row_mean /= D
        sum_sq = np.zeros(rows)
        for r, c in _blocks(rows, D):
            centred_x = x[r, c] - row_mean[r, None]
            sum_sq[r] += (centred_x * centred_x).sum(axis=1)
        row_rstd = 1.0 / np.sqrt(sum_sq / D + eps)
        for r, c in _blocks(rows, D):
            normalized = (x[r, c] - row_mean[r, None]) * row_rstd[r, None]
            w, b = _column(weight, c), _column(bias, c)
            if w is not None:
                normalized *= w
            if b is not None:
                normalized += b
            y[r, c] = normalized
    if mean is not None:
        mean[...] = row_mean
    rstd[...] = row_rstd


def _backward(grad_out, x, mean, rstd, weight, grad_x, grad_weight, grad_bias):
    rows, D = x.shape
    row_rstd = rstd.astype(np.float64)
    row_mean = np.zeros(rows) if mean is None else mean.astype(np.float64)

    def block_terms(r, c):
        """dy, x_hat and g = dy * weight of a block, in float64."""
        dy = grad_out[r, c].astype(np.float64)
        x_hat = (x[r, c] - row_mean[r, None]) * row_rstd[r, None]
        w = _column(weight, c)
        return dy, x_hat, (dy if w is None else dy * w)

    with np.errstate(invalid="ignore", over="ignore"):
        sum_g = np.zeros(rows)
        sum_g_x_hat = np.zeros(rows)
        dw = np.zeros(D) if grad_weight is not None else None
        db = np.zeros(D) if grad_bias is not None else None
        for r, c in _blocks(rows, D):
            dy, x_hat, g = block_terms(r, c)
            sum_g[r] += g.sum(axis=1)
            sum_g_x_hat[r] += (g * x_hat).sum(axis=1)
            if dw is not None:
                dw[c] += (dy * x_hat).sum(axis=0)
            if db is not None:
                db[c] += dy.sum(axis=0)
        if grad_x is not None:
            # d/dx of (x - mean) * rstd: the mean term only where the forward centred.
            for r, c in _blocks(rows, D):
                dy, x_hat, g = block_terms(r, c)
                projected = g - x_hat * (sum_g_x_hat[r, None] / D)
                if mean is not None:
                    projected -= sum_g[r, None] / D
                grad_x[r, c] = projected * row_rstd[r, None]
        if dw is not None:
            grad_weight[...] = dw
        if db is not None:
            grad_bias[...] = db


def layer_norm_forward(x, weight, bias, eps, y, mean, rstd, n_threads):
    _forward(x, weight, bias, eps, True, y, mean, rstd)


def layer_norm_backward(grad_out, x, mean, rstd, weight, grad_x, grad_weight, grad_bias,
                        n_threads):
    _backward(grad_out, x, mean, rstd, weight, grad_x, grad_weight, grad_bias)


def rms_norm_forward(x, weight, eps, y, rstd, n_threads):
    _forward(x, weight, None, eps, False, y, None, rstd)


def rms_norm_backward(grad_out, x, rstd, weight, grad_x, grad_weight, n_threads):
    _backward(grad_out, x, None, rstd, weight, grad_x, grad_weight, None)
