"""Where torch's CPU norm ops give wrong numbers: each op on odd but legal memory
layouts against torch's own result on contiguous memory, in float64.

Run by ``python bench/torch_layout_bugs.py`` (`main`); the tests use `laid_out`.

Channels-last memory is ambiguous where a dim has size 1: with N = 1 the batch stride
is free (a view or a reshape gives one other than C x spatial), with H = W = 1 every
layout is the same memory. So each op (batch_norm, instance_norm, group_norm,
layer_norm and rms_norm over (C, *spatial) and over the last dim), in each mode
(training, eval with running statistics; affine or not) runs forward and backward
with the input x and the output gradient dy laid out, each on its own, as

- ``contiguous``;
- ``channels_last`` (``.to(memory_format=...)``; for 3-D input the (N, L, C) memory);
- ``channels_last_view``: channels-last memory with another batch stride (N = 1);
- ``contiguous_view``: contiguous memory with another batch stride (N = 1);

on shapes with N = 1 and N > 1, spatial sizes of 1 and more, 3-D to 5-D. Every output,
gradient and running statistic is compared with the contiguous run; the cases that
differ by more than 1e-9 (relative to the largest value) are printed, grouped.
docs/nn.md ("Where torch is wrong") lists what this found on torch 2.13, and
`fastbn.nn.functional.torch_is_wrong` keeps fastbn.nn's default routing off it.

torch is imported when a function runs, so this module imports without it.
"""
import itertools
import math


OPS = ("batch_norm", "instance_norm", "group_norm", "layer_norm", "layer_norm_last_dim",
       "rms_norm", "rms_norm_last_dim")
LAYOUTS = ("contiguous", "channels_last", "channels_last_view", "contiguous_view")
SHAPES = ((1, 4, 5), (1, 4, 1), (2, 4, 5), (1, 4, 3, 5), (1, 4, 1, 1), (2, 4, 1, 1),
          (1, 8, 1, 3), (1, 4, 7, 1), (2, 4, 3, 5), (1, 64, 7, 7), (4, 32, 1, 1),
          (1, 6, 2, 3, 4), (1, 4, 1, 1, 1), (2, 4, 1, 1, 1), (2, 6, 2, 3, 4))
GROUPS = 2
EPS = 1e-5
TOLERANCE = 1e-9
# Any value other than C x spatial: the batch stride is free when N = 1.
ODD_BATCH_STRIDE = 7


def channels_last(t):
    import torch

    if t.dim() == 3:
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    return t.to(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)


def laid_out(t, layout):
    """`t`'s values in `layout` (one of `LAYOUTS`), or None where the layout needs N = 1."""
    import torch

    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        return channels_last(t)
    if t.shape[0] != 1:
        return None
    base = t.contiguous() if layout == "contiguous_view" else channels_last(t)
    return torch.as_strided(base, base.shape, (ODD_BATCH_STRIDE,) + base.stride()[1:])


def per_element(vector, x, dims):
    """A per-channel vector as a parameter of shape x.shape[dims:] (layer and RMS norm)."""
    if vector is None:
        return None
    shape = x.shape[dims:]
    if dims == x.dim() - 1:
        return vector[0].expand(shape).contiguous()
    return vector.view((-1,) + (1,) * (x.dim() - 2)).expand(shape).contiguous()


def run(op, x, parameters, training, grad_out):
    """Forward and backward of `op`: {name: output, gradient or running statistic}."""
    import torch.nn.functional as F

    weight, bias, running_mean, running_var = [
        None if p is None else p.clone() for p in parameters]
    for p in (weight, bias):
        if p is not None:
            p.requires_grad_()
    x = x.detach().requires_grad_()
    if op == "batch_norm":
        y = F.batch_norm(x, running_mean, running_var, weight, bias, training, 0.1, EPS)
    elif op == "instance_norm":
        y = F.instance_norm(x, running_mean, running_var, weight, bias, training, 0.1, EPS)
    elif op == "group_norm":
        y = F.group_norm(x, GROUPS, weight, bias, EPS)
    else:
        dims = x.dim() - 1 if op.endswith("last_dim") else 1
        shape = x.shape[dims:]
        if op.startswith("layer_norm"):
            y = F.layer_norm(x, shape, per_element(weight, x, dims),
                             per_element(bias, x, dims), EPS)
        else:
            y = F.rms_norm(x, shape, per_element(weight, x, dims), EPS)
    y.backward(grad_out)
    outputs = {"y": y, "grad_x": x.grad}
    if weight is not None:
        outputs.update(grad_weight=weight.grad, grad_bias=bias.grad)
    if running_mean is not None:
        outputs.update(running_mean=running_mean, running_var=running_var)
    return {name: value for name, value in outputs.items() if value is not None}


def configurations(op, shape):
    """(affine, training, track_running_stats) that `op` takes on `shape`."""
    spatial = math.prod(shape[2:])
    for affine, training, track in itertools.product((False, True), repeat=3):
        if op not in ("batch_norm", "instance_norm") and (track or not training):
            continue
        if op in ("batch_norm", "instance_norm") and not training and not track:
            continue  # eval mode needs running statistics
        if op == "batch_norm" and training and shape[0] * spatial == 1:
            continue  # one value per channel
        if op == "instance_norm" and training and spatial == 1:
            continue
        yield affine, training, track


def search(ops=OPS, shapes=SHAPES):
    """{(op, affine, training, track, x layout, dy layout): [(shape, output, error)]}."""
    import torch

    torch.manual_seed(0)
    found = {}
    for op, shape in itertools.product(ops, shapes):
        channels = shape[1]
        for affine, training, track in configurations(op, shape):
            x = torch.randn(shape, dtype=torch.float64) * 2 + 1
            grad_out = torch.randn(shape, dtype=torch.float64)
            parameters = (torch.rand(channels, dtype=torch.float64) + 0.5 if affine else None,
                          torch.randn(channels, dtype=torch.float64) if affine else None,
                          torch.randn(channels, dtype=torch.float64) if track else None,
                          torch.rand(channels, dtype=torch.float64) + 0.5 if track else None)
            expected = run(op, x, parameters, training, grad_out)
            for x_layout, dy_layout in itertools.product(LAYOUTS, repeat=2):
                x_in, dy_in = laid_out(x, x_layout), laid_out(grad_out, dy_layout)
                if x_in is None or dy_in is None:
                    continue
                got = run(op, x_in, parameters, training, dy_in)
                for name, want in expected.items():
                    error = (got[name] - want).abs().max().item()
                    if error > TOLERANCE * max(1.0, want.abs().max().item()):
                        key = (op, affine, training, track, x_layout, dy_layout)
                        found.setdefault(key, []).append((shape, name, error))
    return found


def main():
    import torch

    torch.set_num_threads(2)
    print(f"torch {torch.__version__}: results that differ from torch's own on contiguous "
          f"memory (float64, tolerance {TOLERANCE:g})\n")
    found = search()
    print("| op | affine | training | running stats | x | dy | shapes: output (max error) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for (op, affine, training, track, x_layout, dy_layout), errors in found.items():
        cells = ", ".join(f"{'x'.join(map(str, shape))}: {name} ({error:.2g})"
                          for shape, name, error in errors)
        print(f"| {op} | {affine} | {training} | {track} | {x_layout} | {dy_layout} | {cells} |")
    print(f"\n{len(found)} configurations differ "
          f"({'none' if not found else ', '.join(sorted({key[0] for key in found}))}).")
