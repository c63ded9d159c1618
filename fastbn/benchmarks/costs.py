"""What each part of fastbn.nn's path costs: the per-call parts on a tiny input
(`per_call_parts`), and where a converted network's training step spends its BatchNorm
time (`network_parts`). `python -m fastbn bench` records both in results.json; docs/nn.md
shows them (issue 11: find the module path's cost before changing it).

torch is imported when a measurement runs, so this module imports without it.
"""
import resource
import time

import fastbn
from fastbn.benchmarks.timing import alternate

TINY_SHAPE = (1, 16, 8, 8)


def per_call_parts(threads, repeats=30, shape=TINY_SHAPE):
    """Median time per call (us) of a BatchNorm2d training step on a tiny input through
    torch.nn and through fastbn.nn, and of the parts of fastbn's path timed alone.

    Returns
    -------
    dict of str to float
    """
    import torch

    from fastbn import batch_norm
    from fastbn._backends import load_backend
    from fastbn._layout import kernel_view
    from fastbn.nn import BatchNorm2d, BatchNormAct2d, _function, functional

    class DoNothing(torch.autograd.Function):
        """The cheapest Python autograd op: saves its inputs, returns a new tensor."""

        @staticmethod
        def forward(ctx, x, weight, bias):
            ctx.save_for_backward(x, weight)
            return torch.empty_like(x)

        @staticmethod
        def backward(ctx, grad_y):
            ctx.saved_tensors
            return grad_y, None, None

    torch.set_num_threads(threads)
    fastbn.set_num_threads(threads)
    torch.manual_seed(0)
    channels = shape[1]
    backend = fastbn.get_backend()
    x = torch.randn(shape, requires_grad=True)
    grad_y = torch.randn(shape)
    reference = torch.nn.BatchNorm2d(channels)
    reference_act = torch.nn.Sequential(torch.nn.BatchNorm2d(channels), torch.nn.ReLU6(True))
    named = BatchNorm2d(channels, backend=backend)
    fused = BatchNormAct2d(channels, act="relu6", backend=backend)
    weight, bias = reference.weight, reference.bias
    x_array, weight_array, bias_array, grad_array = (t.detach().numpy()
                                                     for t in (x, weight, bias, grad_y))
    running = [reference.running_mean.numpy().copy(), reference.running_var.numpy().copy()]
    running_tensors = [torch.from_numpy(a) for a in running]
    _, mean, invstd = fastbn.batch_norm_forward(x_array, weight_array, bias_array, *running,
                                                training=True)
    kernels = load_backend(backend)
    layout = kernel_view(x_array)
    cases = {
        "torch.nn.BatchNorm2d step": lambda: reference(x).backward(grad_y),
        "torch.nn.BatchNorm2d + ReLU6 step": lambda: reference_act(x).backward(grad_y),
        "fastbn.nn.BatchNorm2d step": lambda: named(x).backward(grad_y),
        "fastbn.nn.BatchNormAct2d(act='relu6') step": lambda: fused(x).backward(grad_y),
        "empty autograd.Function step": lambda: DoNothing.apply(x, weight, bias).backward(grad_y),
        "NumPy API forward (checks included)": lambda: fastbn.batch_norm_forward(
            x_array, weight_array, bias_array, *running, training=True),
        "NumPy API backward (checks included)": lambda: fastbn.batch_norm_backward(
            grad_array, x_array, weight_array, mean, invstd, True),
        "fastbn.nn's forward call (run_forward, no checks)": lambda: batch_norm.run_forward(
            kernels, x_array, weight_array, bias_array, *running, True, 0.1, 1e-5,
            layout=layout),
        "fastbn.nn's backward call (run_backward, no checks)": lambda: batch_norm.run_backward(
            kernels, grad_array, x_array, weight_array, mean, invstd, True, (True, True, True),
            layout=layout),
        "routing decision (runs_on_fastbn, torch_is_faster)": lambda: (
            _function.runs_on_fastbn(x, weight, bias, *running_tensors)
            and functional.torch_is_faster("batch_norm", x, False)),
        "tensor.numpy(force=True)": lambda: x.numpy(force=True),
        "torch.from_numpy": lambda: torch.from_numpy(x_array),
    }
    timings = alternate(cases, repeats=repeats, warmup=3)
    return {name: timing.median_s * 1e6 for name, timing in timings.items()}


class _Accumulate:
    """Wrap `owner.name` (a function or staticmethod) so that each call adds its time to
    `totals[key]`; `restore()` puts the original back."""

    def __init__(self, owner, name, totals, key, static=False):
        self.owner, self.name, self.static = owner, name, static
        self.original = owner.__dict__[name] if static else getattr(owner, name)
        function = self.original.__func__ if static else self.original

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                totals[key] += time.perf_counter() - start

        setattr(owner, name, staticmethod(timed) if static else timed)

    def restore(self):
        setattr(self.owner, self.name, self.original)


def network_parts(model="mobilenet_v2", batch=8, image_size=112, threads=2, steps=8,
                  small=False):
    """Where a converted network's training step spends its BatchNorm time, measured
    inside the step (ms per step): the kernels (forward, backward), fastbn.nn's calls
    around them (`run_forward` / `run_backward`: layout, outputs), the autograd Function
    around those (`NormFunction.forward` / `.backward`) and the modules' forward (checks,
    routing, the Function's creation); then the page faults per step, and the whole step
    of torch's layers, the converted network and the network without BatchNorm and
    activation, alternated without the instrumentation (medians).

    Returns
    -------
    dict of str to float
    """
    import torch

    from fastbn import batch_norm
    from fastbn._backends import load_backend
    from fastbn.benchmarks.end_to_end import NetworkCase
    from fastbn.nn import _function, modules

    torch.set_num_threads(threads)
    fastbn.set_num_threads(threads)
    case = NetworkCase(model, batch, "training", image_size, small)
    steps_of = {name: step for name, step in case.steps().items()
                if name in ("torch", "convert", "no_batch_norm_activation")}
    timings = alternate(steps_of, repeats=steps, warmup=2)  # also warms up every network
    parts = {f"step, {name} (ms)": timing.median_s * 1e3 for name, timing in timings.items()}
    for name, step in steps_of.items():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(steps):
            step()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        parts[f"page faults per step, {name}"] = faults / steps
    kernels = load_backend(fastbn.get_backend())
    totals = dict.fromkeys(["kernels forward", "kernels backward", "run_forward",
                            "run_backward", "NormFunction.forward", "NormFunction.backward",
                            "module forward"], 0.0)
    wrappers = [
        _Accumulate(kernels, "batch_norm_forward", totals, "kernels forward"),
        _Accumulate(kernels, "batch_norm_backward", totals, "kernels backward"),
        _Accumulate(batch_norm, "run_forward", totals, "run_forward"),
        _Accumulate(batch_norm, "run_backward", totals, "run_backward"),
        _Accumulate(_function.NormFunction, "forward", totals, "NormFunction.forward",
                    static=True),
        _Accumulate(_function.NormFunction, "backward", totals, "NormFunction.backward",
                    static=True),
        _Accumulate(modules._BatchNorm, "forward", totals, "module forward"),
    ]
    try:
        for _ in range(steps):
            steps_of["convert"]()
    finally:
        for wrapper in wrappers:
            wrapper.restore()
    parts.update({f"{key} (ms per step)": value / steps * 1e3 for key, value in totals.items()})
    return parts


def table(records):
    """Markdown lines: the per-call parts, then each network's parts (records of
    `per_call_parts` / `network_parts`, keyed as `report.run_report` stores them)."""
    if not records:
        return []
    lines = ["", "## What each part of fastbn.nn's path costs", ""]
    per_call = records.get("per_call")
    if per_call:
        lines += [f"A BatchNorm2d training step on {'x'.join(map(str, TINY_SHAPE))} and its "
                  "parts alone (medians):", "", "| case | us per call |", "|---|---:|"]
        lines += [f"| {name} | {value:.1f} |" for name, value in per_call.items()]
    networks = [name for name in records if name != "per_call"]
    if networks:
        lines += ["", "Inside a converted network's training step (the kernels, the calls "
                  "around them, the autograd Function, the modules' forward; then page "
                  "faults and whole steps):", "",
                  "| part | " + " | ".join(networks) + " |", "|---|" + "---:|" * len(networks)]
        for part in records[networks[0]]:
            lines.append(f"| {part} | " + " | ".join(
                f"{records[name][part]:.1f}" if part in records[name] else ""
                for name in networks) + " |")
    return lines
