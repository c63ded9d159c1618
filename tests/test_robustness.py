"""What docs/robustness.md guarantees, each kept by the tests here: `out=` that overlaps an
input, forked children, the memory of long rows, huge values, and the probes of issue 18
that passed and must keep passing (no memory growth over many calls, thread safety,
serialization; arrays past 2^31 values are in the `slow` tests, see tests/conftest.py).
torch's edge-case semantics (eps, C = 0) are in test_edge_semantics.py, PyTorch's own
OpInfo samples in test_opinfo.py."""
import copy
import io
import json
import multiprocessing
import os
import pickle
import select
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
import warnings

import numpy as np
import pytest
import torch

import fastbn
import fastbn.nn as fnn
from conftest import BACKENDS

THREADED_BACKENDS = [b for b in BACKENDS if b != "numpy"]  # the compiled ones


def by_backend(values):
    """pytest params (backend, value) for every backend."""
    return [pytest.param(backend, value, id=f"{backend}-{value}")
            for backend in BACKENDS for value in values]


# ---------------------------------------------------------------------------
# 1. out= that overlaps an input: computed as if the inputs were read first (through a
#    temporary), as NumPy's ufuncs do; out that is exactly x (or grad_out) stays in place.

def channels_last(a):
    """a's values in new memory with the channels the fastest axis (a view of shape a.shape)."""
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1)


def view_like(flat, a):
    """`flat` (1-D, a.size values) viewed with a's shape and a's layout (C or channels-last)."""
    if a.flags.c_contiguous:
        return flat.reshape(a.shape)
    moved_shape = (a.shape[0],) + a.shape[2:] + (a.shape[1],)
    return np.moveaxis(flat.reshape(moved_shape), -1, 1)


def overlap_cases():
    """name -> (make(layout, backend) -> (arrays, call), names out may overlap, layouts).
    `call(arrays, out)` runs the op and returns its results, the first being what `out`
    holds."""
    f32 = np.float32

    def channel_inputs(layout, shape=(4, 8, 10, 10)):
        rng = np.random.default_rng(0)
        x = rng.standard_normal(shape).astype(f32)
        x = channels_last(x) if layout == "channels_last" else x
        C = shape[1]
        return dict(x=x, grad_out=view_like(rng.standard_normal(x.size).astype(f32), x),
                    weight=rng.uniform(0.5, 1.5, C).astype(f32),
                    bias=rng.standard_normal(C).astype(f32),
                    running_mean=rng.standard_normal(C).astype(f32),
                    running_var=rng.uniform(0.5, 1.5, C).astype(f32))

    def batch_norm_forward(training):
        def make(layout, backend):
            a = channel_inputs(layout)
            return a, lambda a, out: fastbn.batch_norm_forward(
                a["x"], a["weight"], a["bias"], a["running_mean"], a["running_var"], training,
                out=out, backend=backend)
        return make, ("x", "weight", "bias", "running_mean", "running_var")

    def batch_norm_backward(training):
        def make(layout, backend):
            a = channel_inputs(layout)
            _, a["save_mean"], a["save_invstd"] = fastbn.batch_norm_forward(
                a["x"], a["weight"], a["bias"], a["running_mean"].copy(), a["running_var"].copy(),
                training, backend="numpy")
            return a, lambda a, out: fastbn.batch_norm_backward(
                a["grad_out"], a["x"], a["weight"], a["save_mean"], a["save_invstd"], training,
                out=out, backend=backend)
        return make, ("x", "grad_out", "weight", "save_mean", "save_invstd")

    def group_norm_forward(layout, backend):
        a = channel_inputs(layout)
        return a, lambda a, out: fastbn.group_norm_forward(a["x"], 4, a["weight"], a["bias"],
                                                           out=out, backend=backend)

    def group_norm_backward(layout, backend):
        a = channel_inputs(layout)
        _, a["mean"], a["rstd"] = fastbn.group_norm_forward(a["x"], 4, backend="numpy")
        return a, lambda a, out: fastbn.group_norm_backward(
            a["grad_out"], a["x"], a["mean"], a["rstd"], a["weight"], 4, out=out, backend=backend)

    def instance_norm_forward(use_input_stats):
        def make(layout, backend):
            a = channel_inputs(layout)
            return a, lambda a, out: fastbn.instance_norm_forward(
                a["x"], a["weight"], a["bias"], a["running_mean"], a["running_var"],
                use_input_stats, out=out, backend=backend)
        return make, ("x", "weight", "bias", "running_mean", "running_var")

    def instance_norm_backward(layout, backend):
        a = channel_inputs(layout)
        _, a["mean"], a["rstd"] = fastbn.instance_norm_forward(a["x"], backend="numpy")
        return a, lambda a, out: fastbn.instance_norm_backward(
            a["grad_out"], a["x"], a["mean"], a["rstd"], a["weight"], out=out, backend=backend)

    def row_inputs(layout):
        rng = np.random.default_rng(1)
        # "rows": many short rows; "long_row": one row cut into chunks by the kernels.
        shape = (6, 40) if layout == "rows" else (1, 20000)
        D = shape[1]
        x = (rng.standard_normal(shape) + 2).astype(f32)
        return dict(x=x, grad_out=rng.standard_normal(shape).astype(f32),
                    weight=rng.uniform(0.5, 1.5, D).astype(f32),
                    bias=rng.standard_normal(D).astype(f32))

    def layer_norm_forward(layout, backend):
        a = row_inputs(layout)
        D = a["x"].shape[1]
        return a, lambda a, out: fastbn.layer_norm_forward(a["x"], D, a["weight"], a["bias"],
                                                           out=out, backend=backend)

    def layer_norm_backward(layout, backend):
        a = row_inputs(layout)
        D = a["x"].shape[1]
        _, a["mean"], a["rstd"] = fastbn.layer_norm_forward(a["x"], D, backend="numpy")
        return a, lambda a, out: fastbn.layer_norm_backward(
            a["grad_out"], a["x"], D, a["mean"], a["rstd"], a["weight"], a["bias"], out=out,
            backend=backend)

    def rms_norm_forward(layout, backend):
        a = row_inputs(layout)
        return a, lambda a, out: fastbn.rms_norm_forward(a["x"], a["x"].shape[1], a["weight"],
                                                         out=out, backend=backend)

    def rms_norm_backward(layout, backend):
        a = row_inputs(layout)
        D = a["x"].shape[1]
        _, a["rstd"] = fastbn.rms_norm_forward(a["x"], D, backend="numpy")
        return a, lambda a, out: fastbn.rms_norm_backward(
            a["grad_out"], a["x"], D, a["rstd"], a["weight"], out=out, backend=backend)

    channel_layouts = ("contiguous", "channels_last")
    row_layouts = ("rows", "long_row")
    return {
        "batch_norm_forward-train": (*batch_norm_forward(True), channel_layouts),
        "batch_norm_forward-eval": (*batch_norm_forward(False), channel_layouts),
        "batch_norm_backward-train": (*batch_norm_backward(True), channel_layouts),
        "batch_norm_backward-eval": (*batch_norm_backward(False), channel_layouts),
        "group_norm_forward": (group_norm_forward, ("x", "weight", "bias"), channel_layouts),
        "group_norm_backward": (group_norm_backward, ("x", "grad_out", "weight", "mean", "rstd"),
                                channel_layouts),
        "instance_norm_forward-input_stats": (*instance_norm_forward(True), channel_layouts),
        "instance_norm_forward-running_stats": (*instance_norm_forward(False), channel_layouts),
        "instance_norm_backward": (instance_norm_backward,
                                   ("x", "grad_out", "weight", "mean", "rstd"), channel_layouts),
        "layer_norm_forward": (layer_norm_forward, ("x", "weight", "bias"), row_layouts),
        "layer_norm_backward": (layer_norm_backward, ("x", "grad_out", "weight", "mean", "rstd"),
                                row_layouts),
        "rms_norm_forward": (rms_norm_forward, ("x", "weight"), row_layouts),
        "rms_norm_backward": (rms_norm_backward, ("x", "grad_out", "weight", "rstd"),
                              row_layouts),
    }


OVERLAP_CASES = overlap_cases()
SAME_SHAPE = ("x", "grad_out")
# Where `out` sits against the input it overlaps: for x / grad_out, shifted by one value
# either way or by one row of the kernels' view (same strides, other start); for the
# smaller inputs (parameters, statistics), inside out's span or across its end.
SHIFTS = {"same shape": ("+1", "-1", "+row"), "smaller": ("inside", "across_end")}
OVERLAPS = [(case, layout, name, shift)
            for case, (_, names, layouts) in OVERLAP_CASES.items() for layout in layouts
            for name in names
            for shift in SHIFTS["same shape" if name in SAME_SHAPE else "smaller"]
            if not (layout == "long_row" and shift == "+row")]  # one row: nothing to shift


def overlapping(arrays, name, shift):
    """(arrays with `name` moved into a buffer, out in the same buffer) overlapping as
    `shift` says; out is laid out as x."""
    x, a = arrays["x"], arrays[name]
    n = x.size
    if name in SAME_SHAPE:
        step = {"+1": 1, "-1": -1, "+row": x.shape[-1] if x.flags.c_contiguous else x.shape[1]}
        k = step[shift]
        buffer = np.zeros(n + abs(k), x.dtype)
        a_start, out_start = (0, k) if k > 0 else (-k, 0)
        target = view_like(buffer[a_start:a_start + n], a)
        out = view_like(buffer[out_start:out_start + n], x)
    else:
        buffer = np.zeros(n + a.size, x.dtype)
        out = view_like(buffer[:n], x)
        start = n // 2 if shift == "inside" else n - max(a.size // 2, 1)
        target = buffer[start:start + a.size].reshape(a.shape)
    target[...] = a
    assert np.shares_memory(target, out) and target.__array_interface__ != out.__array_interface__
    return dict(arrays, **{name: target}), out


@pytest.mark.parametrize("case, layout, name, shift", OVERLAPS,
                         ids=["-".join(overlap) for overlap in OVERLAPS])
def test_out_overlapping_an_input_gives_the_same_results(backend, case, layout, name, shift):
    """`out` sharing part of its memory with any input gives the results of a call with
    a separate `out`, in every backend (an output on the overlapping input's memory is
    what the call writes last)."""
    make, _, _ = OVERLAP_CASES[case]
    arrays, call = make(layout, backend)
    expected = call({key: np.copy(value) for key, value in arrays.items()},
                    np.empty_like(arrays["x"]))
    arrays, out = overlapping(arrays, name, shift)
    results = call(arrays, out)
    assert results[0] is out
    for got, want in zip(results, expected):
        if want is not None:
            np.testing.assert_array_equal(got, want)


EXACT = [(case, layout, name) for case, (_, names, layouts) in OVERLAP_CASES.items()
         for layout in layouts for name in names if name in SAME_SHAPE]


@pytest.mark.parametrize("as_view", [False, True], ids=["same_object", "other_view"])
@pytest.mark.parametrize("case, layout, name", EXACT, ids=["-".join(e) for e in EXACT])
def test_out_that_is_exactly_an_input_is_updated_in_place(backend, case, layout, name, as_view):
    """out=x (or out=grad_out), as the same object or another view of the same memory in the
    same layout, is written in place with the results of an out-of-place call."""
    make, _, _ = OVERLAP_CASES[case]
    arrays, call = make(layout, backend)
    expected = call({key: np.copy(value) for key, value in arrays.items()}, None)
    out = arrays[name][...] if as_view else arrays[name]
    results = call(arrays, out)
    assert results[0] is out
    for got, want in zip(results, expected):
        if want is not None:
            np.testing.assert_array_equal(got, want)


def in_place_params():
    """(backend, case, layout, name) of the compiled backends for inputs of 10 KB or more,
    where a temporary of x's size would stand out; numba's LayerNorm / RMSNorm backward
    still copies, and its RMSNorm forward makes an array of zeros for the bias it lacks
    (fastbn/_numba/layer_norm.py)."""
    params = []
    for backend in THREADED_BACKENDS:
        for case, layout, name in EXACT:
            if layout == "rows":
                continue  # 960 bytes: too small to tell from the call's own objects
            # The numba row kernels' backward writes dx before its parameter-gradient
            # sums read dy and x, so an in-place backward goes through a temporary there.
            copies = backend == "numba" and case in ("layer_norm_backward", "rms_norm_backward")
            params.append(pytest.param(backend, case, layout, name,
                                       id=f"{backend}-{case}-{layout}-{name}",
                                       marks=[pytest.mark.xfail(strict=True, reason=(
                                           "numba's row backward computes dx apart when it "
                                           "overwrites an input"))] if copies else []))
    return params


@pytest.mark.parametrize("backend, case, layout, name", in_place_params())
def test_out_that_is_exactly_an_input_allocates_no_temporary(backend, case, layout, name):
    make, _, _ = OVERLAP_CASES[case]
    arrays, call = make(layout, backend)
    call(arrays, np.empty_like(arrays["x"]))  # kernels loaded, caches warm
    tracemalloc.start()  # NumPy reports its allocations to tracemalloc
    try:
        results = call(arrays, arrays[name])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # The results the call returns are new arrays the math needs (for one row, grad_weight
    # is as long as x); anything beyond them is a temporary.
    outputs = sum(a.nbytes for a in results[1:] if a is not None)
    assert peak - outputs < arrays["x"].nbytes / 2, (
        f"{peak - outputs} bytes of temporaries for an input of {arrays['x'].nbytes}")


def test_the_overlap_check_costs_nothing_without_out(backend, monkeypatch):
    """Calls without out= never look for overlaps (the check runs only on an out= array)."""
    def fail(*args):
        raise AssertionError("overlap check on the out=None path")
    monkeypatch.setattr(fastbn._layout, "writes_through_temporary", fail)
    for make, _, layouts in OVERLAP_CASES.values():
        for layout in layouts:
            arrays, call = make(layout, backend)
            call(arrays, None)


# ---------------------------------------------------------------------------
# 3. Forked children run on one thread (no OpenMP region, no numba thread pool) until
#    they call set_num_threads, with one warning; torch's DataLoader workers just work.

def op_calls(backend, size="large", seed=7):
    """op name -> a call running its forward and backward on fixed inputs (made from
    `seed`), returning every array they give. size "large": 2 threads' worth of values
    (over 2 x 16384), with each op on each of its kernels' work splits (GroupNorm whole
    groups, chunks and channels-last; LayerNorm / RMSNorm whole rows and few long rows);
    "small": 4096 values."""
    rng = np.random.default_rng(seed)
    f32 = np.float32
    S = 2048 if size == "large" else 64
    x = rng.standard_normal((4, 16, S)).astype(f32)
    dy = rng.standard_normal(x.shape).astype(f32)
    x_last, dy_last = channels_last(x), channels_last(dy)
    w = rng.uniform(0.5, 1.5, 16).astype(f32)
    b = rng.standard_normal(16).astype(f32)
    row_shapes = [(64, S), (2, 32 * S)]  # whole rows; few long rows (cut into chunks)

    def batch_norm():
        results = []
        for xs, dys in ((x, dy), (x_last, dy_last)):
            rm, rv = np.zeros(16, f32), np.ones(16, f32)
            y, mean, invstd = fastbn.batch_norm_forward(xs, w, b, rm, rv, True, backend=backend)
            results += [y, mean, invstd, rm, rv, *fastbn.batch_norm_backward(
                dys, xs, w, mean, invstd, True, backend=backend)]
        return results

    def group_norm():
        results = []
        for xs, dys, G in ((x, dy, 8), (x, dy, 2), (x_last, dy_last, 4)):
            y, mean, rstd = fastbn.group_norm_forward(xs, G, w, b, backend=backend)
            results += [y, mean, rstd, *fastbn.group_norm_backward(dys, xs, mean, rstd, w, G,
                                                                   backend=backend)]
        return results

    def instance_norm():
        rm, rv = np.zeros(16, f32), np.ones(16, f32)
        y, mean, rstd = fastbn.instance_norm_forward(x, w, b, rm, rv, backend=backend)
        return [y, mean, rstd, rm, rv,
                *fastbn.instance_norm_backward(dy, x, mean, rstd, w, backend=backend)]

    def layer_norm():
        results = []
        for shape in row_shapes:
            xs, dys = x.reshape(shape), dy.reshape(shape)
            D = shape[1]
            wd, bd = np.resize(w, D), np.resize(b, D)
            y, mean, rstd = fastbn.layer_norm_forward(xs, D, wd, bd, backend=backend)
            results += [y, mean, rstd, *fastbn.layer_norm_backward(
                dys, xs, D, mean, rstd, wd, bd, backend=backend)]
        return results

    def rms_norm():
        results = []
        for shape in row_shapes:
            xs, dys = x.reshape(shape), dy.reshape(shape)
            D = shape[1]
            wd = np.resize(w, D)
            y, rstd = fastbn.rms_norm_forward(xs, D, wd, backend=backend)
            results += [y, rstd, *fastbn.rms_norm_backward(dys, xs, D, rstd, wd,
                                                           backend=backend)]
        return results

    return {"batch_norm": batch_norm, "group_norm": group_norm, "instance_norm": instance_norm,
            "layer_norm": layer_norm, "rms_norm": rms_norm}


OPS = ["batch_norm", "group_norm", "instance_norm", "layer_norm", "rms_norm"]


def fork_params():
    return [pytest.param(backend, op, id=f"{backend}-{op}")
            for backend in THREADED_BACKENDS for op in OPS]


@pytest.fixture
def two_threads():
    """fastbn on 2 threads for the test (skipped where OpenMP or numba allow fewer)."""
    import numba
    fastbn.set_num_threads(2)
    try:
        if fastbn.get_num_threads() < 2 or numba.config.NUMBA_NUM_THREADS < 2:
            pytest.skip("needs 2 threads")
        yield
    finally:
        fastbn.set_num_threads(None)


def check_in_child(call, expected):
    """What a forked child reports about `call`: its results against `expected`, the
    warnings it gave, and the thread counts before and after set_num_threads(None)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = call()
        second = call()  # warned once, not on every call
    report = dict(equal=all(np.array_equal(a, b) for a, b in zip(first + second, expected * 2)),
                  warnings=[f"{w.category.__name__}: {w.message}" for w in caught],
                  threads=fastbn.get_num_threads())
    fastbn.set_num_threads(2)  # the user takes the threads back
    report["threads_after_set"] = fastbn.get_num_threads()
    fastbn.set_num_threads(None)  # the usual default again, not the fork's 1
    report["threads_after_reset"] = fastbn.get_num_threads()
    return report


def run_in_fork(function, timeout=60):
    """function()'s JSON-able result, computed in a child made by os.fork(); a child that
    hangs is killed after `timeout` seconds and one that dies is reported, as failures."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read_end)
            os.write(write_end, json.dumps(function()).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([read_end], [], [], timeout)
            if not ready:
                os.kill(pid, signal.SIGKILL)
                pytest.fail(f"the forked child hung (killed after {timeout} s)")
            chunk = os.read(read_end, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
        _, status = os.waitpid(pid, 0)
    if not chunks:
        pytest.fail(f"the forked child died without a result (wait status {status})")
    return json.loads(b"".join(chunks))


def assert_one_thread_report(report):
    assert report["equal"], "the child's results differ from the parent's"
    assert report["threads"] == 1
    assert len(report["warnings"]) == 1, report["warnings"]
    assert report["warnings"][0].startswith("RuntimeWarning: fastbn runs on 1 thread")
    assert "fork" in report["warnings"][0] and "set_num_threads" in report["warnings"][0]
    assert report["threads_after_set"] == 2 and report["threads_after_reset"] > 1


@pytest.mark.parametrize("backend, op", fork_params())
def test_forked_child_after_a_threaded_call_runs_on_one_thread(two_threads, backend, op):
    call = op_calls(backend)[op]
    expected = call()  # on 2 threads: the parent's OpenMP / numba pool is running now
    report = run_in_fork(lambda: check_in_child(call, expected))
    assert_one_thread_report(report)


FORK_POOL_CALLS = {}  # (backend, op) -> (call, expected), inherited by the pool's children


def pool_task(key):
    call, expected = FORK_POOL_CALLS[key]
    return check_in_child(call, expected)


@pytest.mark.parametrize("backend, op", fork_params())
def test_multiprocessing_fork_pool_after_a_threaded_call(two_threads, backend, op):
    call = op_calls(backend)[op]
    FORK_POOL_CALLS[backend, op] = (call, call())
    try:
        with multiprocessing.get_context("fork").Pool(2) as pool:
            workers = pool_workers()
            result = pool.map_async(pool_task, [(backend, op)] * 2)
            deadline = time.monotonic() + 60
            while not result.ready():
                result.wait(0.2)
                # A dead worker's task is never answered: fail now rather than at the deadline.
                if not result.ready() and not workers <= pool_workers():
                    pytest.fail("a 'fork' pool worker died")
                if time.monotonic() > deadline:
                    pytest.fail("a 'fork' pool worker hung (no result after 60 s)")
            reports = result.get()
    finally:
        del FORK_POOL_CALLS[backend, op]
    for report in reports:
        assert_one_thread_report(report)


def pool_workers():
    """The pids of the live multiprocessing.Pool workers of this process."""
    return {child.pid for child in multiprocessing.active_children()
            if child.name.startswith("ForkPoolWorker")}


def test_set_num_threads_in_the_parent_is_what_the_child_warns_about(two_threads):
    """The warning names what the parent would have used, and a child whose count would be
    1 anyway is not warned."""
    call = op_calls("cython" if "cython" in BACKENDS else "numpy", "small")["batch_norm"]
    expected = call()
    fastbn.set_num_threads(1)
    report = run_in_fork(lambda: check_in_child(call, expected))
    assert report["equal"] and report["warnings"] == [] and report["threads"] == 1
    fastbn.set_num_threads(2)
    report = run_in_fork(lambda: check_in_child(call, expected))
    assert "would use 2" in report["warnings"][0]


class KernelDataset(torch.utils.data.Dataset):
    """Each item runs one op's kernels in a DataLoader worker (torch sets 1 thread there)."""

    def __init__(self, backend, op):
        self.backend, self.op = backend, op

    def __len__(self):
        return 4

    def __getitem__(self, index):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results = op_calls(self.backend)[self.op]()
        return [torch.from_numpy(a) for a in results], len(caught), fastbn.get_num_threads()


@pytest.mark.parametrize("backend, op", fork_params())
def test_dataloader_workers_run_fastbn(two_threads, backend, op):
    """The safe pattern: torch's DataLoader workers (forked) call fastbn on one thread."""
    expected = op_calls(backend)[op]()  # threaded, in the parent first
    loader = torch.utils.data.DataLoader(KernelDataset(backend, op), batch_size=None,
                                         num_workers=2, timeout=60)
    items = list(loader)
    assert len(items) == 4
    for results, n_warnings, threads in items:
        assert threads == 1 and n_warnings == 0  # torch's 1 thread caps fastbn: no warning
        for got, want in zip(results, expected):
            np.testing.assert_array_equal(got.numpy(), want)


# ---------------------------------------------------------------------------
# 4. Memory: no temporary proportional to the data beyond what the math needs. A long
#    row with weight=None and out=x (LayerNorm, RMSNorm) costs a small fraction of it.

MEMORY_SCRIPT = r"""
import json, sys
import numpy as np
import fastbn

backend = sys.argv[1]


def peak_kib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))


def extra_bytes(call):
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # the peak resident size restarts from the current one
    before = peak_kib()
    call()
    return (peak_kib() - before) * 1024


def cases(D):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, D)).astype(np.float32)
    dy = rng.standard_normal((1, D)).astype(np.float32)
    _, mean, rstd = fastbn.layer_norm_forward(x, D, backend=backend)
    _, rms_rstd = fastbn.rms_norm_forward(x, D, backend=backend)
    return x, {
        "layer_norm_forward": lambda: fastbn.layer_norm_forward(x, D, out=x, backend=backend),
        "layer_norm_backward": lambda: fastbn.layer_norm_backward(
            dy, x, D, mean, rstd, out=dy, backend=backend),
        "rms_norm_forward": lambda: fastbn.rms_norm_forward(x, D, out=x, backend=backend),
        "rms_norm_backward": lambda: fastbn.rms_norm_backward(dy, x, D, rms_rstd, out=dy,
                                                              backend=backend),
    }


for call in cases(1 << 14)[1].values():  # load / compile the kernels
    call()
x, calls = cases(int(sys.argv[2]))
print(json.dumps({name: extra_bytes(call) / x.nbytes for name, call in calls.items()}))
"""

# The child's working directory: `python -c` imports fastbn from there first, so it
# must be where the fastbn under test lives.
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(fastbn.__file__)))
MEMORY_OPS = ["layer_norm_forward", "layer_norm_backward", "rms_norm_forward",
              "rms_norm_backward"]


@pytest.fixture(scope="module")
def extra_memory():
    """backend -> op -> peak memory of one call beyond the arrays, in input sizes; measured
    in a fresh process per backend, on one row of 2^22 float32 values (16 MiB)."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pytest.skip("needs /proc/self/clear_refs (Linux) to measure peak memory")
    measured = {}

    def measure(backend):
        if backend not in measured:
            # glibc serves every large block from its own mapping, returned when freed:
            # otherwise freed blocks stay resident and are reused, and the peak misses them.
            environment = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
            done = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, backend, str(1 << 22)],
                                  capture_output=True, text=True, timeout=300, env=environment,
                                  cwd=PACKAGE_PARENT)
            assert done.returncode == 0, done.stderr
            measured[backend] = json.loads(done.stdout)
        return measured[backend]
    return measure


@pytest.mark.parametrize("backend, op", by_backend(MEMORY_OPS))
def test_a_long_row_in_place_without_weight_needs_little_memory(extra_memory, backend, op):
    """weight=None costs nothing (no arrays of ones or zeros) and out=x / out=grad_out run
    in place: the extra memory stays under a tenth of the input, where it was 3x (cython)."""
    assert extra_memory(backend)[op] < 0.1


# ---------------------------------------------------------------------------
# 6. Huge values: float32 input of magnitude 1e19, whose squares overflow float32, gives
#    the float64 answer in every backend (sums of squares go to float64 where they would
#    overflow).

def huge_cases():
    """name -> (op(x, dy, backend) -> results of its forward and backward, input shape,
    layout)."""
    def batch_norm(x, dy, backend):
        y, mean, invstd = fastbn.batch_norm_forward(x, training=True, backend=backend)
        return (y, mean, invstd) + fastbn.batch_norm_backward(dy, x, None, mean, invstd, True,
                                                              backend=backend)

    def group_norm(x, dy, backend):
        y, mean, rstd = fastbn.group_norm_forward(x, 2, backend=backend)
        return (y, mean, rstd) + fastbn.group_norm_backward(dy, x, mean, rstd, None, 2,
                                                            backend=backend)

    def instance_norm(x, dy, backend):
        y, mean, rstd = fastbn.instance_norm_forward(x, backend=backend)
        return (y, mean, rstd) + fastbn.instance_norm_backward(dy, x, mean, rstd, None,
                                                               backend=backend)

    def layer_norm(x, dy, backend):
        D = x.shape[-1]
        y, mean, rstd = fastbn.layer_norm_forward(x, D, backend=backend)
        return (y, mean, rstd) + fastbn.layer_norm_backward(dy, x, D, mean, rstd,
                                                            backend=backend)

    def rms_norm(x, dy, backend):
        D = x.shape[-1]
        # eps given: None would be each dtype's machine epsilon, not one number for both.
        y, rstd = fastbn.rms_norm_forward(x, D, eps=1e-6, backend=backend)
        return (y, rstd) + fastbn.rms_norm_backward(dy, x, D, rstd, backend=backend)

    return {
        "batch_norm": (batch_norm, (4, 3, 500), "contiguous"),
        "group_norm-whole_groups": (group_norm, (16, 4, 300), "contiguous"),
        "group_norm-chunks": (group_norm, (2, 4, 6000), "contiguous"),
        "group_norm-channels_last": (group_norm, (4, 4, 20, 30), "channels_last"),
        "instance_norm": (instance_norm, (4, 3, 700), "contiguous"),
        "layer_norm-rows": (layer_norm, (64, 1000), "contiguous"),
        "layer_norm-long_row": (layer_norm, (1, 50000), "contiguous"),
        "rms_norm-rows": (rms_norm, (64, 1000), "contiguous"),
        "rms_norm-long_row": (rms_norm, (1, 50000), "contiguous"),
    }


HUGE_CASES = huge_cases()


@pytest.mark.parametrize("backend, case", by_backend(HUGE_CASES))
def test_huge_float32_values_give_the_float64_answer(backend, case):
    """float32 input of magnitude 1e19 (squares overflow float32): every result within
    1e-5 of the float64 one, relative to the result's largest value."""
    op, shape, layout = HUGE_CASES[case]
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape) * 1e19
    x = channels_last(x) if layout == "channels_last" else x
    dy = view_like(rng.standard_normal(x.size), x)
    expected = op(x, dy, "numpy")  # float64: squares of 1e19 fit
    got = op(x.astype(np.float32), dy.astype(np.float32), backend)
    for name, a, want in zip(range(len(got)), got, expected):
        if want is not None:
            assert np.isfinite(a).all(), f"result {name} is not finite"
            scale = np.abs(want).max()
            np.testing.assert_allclose(a / scale, want / scale, rtol=0, atol=1e-5,
                                       err_msg=f"result {name}")


@pytest.mark.parametrize("case", HUGE_CASES)
def test_tiny_float32_values_give_the_float64_answer_with_eps(backend, case):
    """float32 input of magnitude 1e-25, whose squares flush to 0 in float32: with eps > 0
    the variance is negligible beside it, and every backend gives the float64 answer."""
    op, shape, layout = HUGE_CASES[case]
    rng = np.random.default_rng(4)
    x = rng.standard_normal(shape) * 1e-25
    x = channels_last(x) if layout == "channels_last" else x
    dy = view_like(rng.standard_normal(x.size), x)
    for a, want in zip(op(x.astype(np.float32), dy.astype(np.float32), backend),
                       op(x, dy, "numpy")):
        if want is not None:
            scale = np.abs(want).max()
            np.testing.assert_allclose(a / scale, want / scale, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------
# Probes that passed in issue 18, kept: memory does not grow over many calls (failing
# ones included), concurrent Python threads get bit-identical results, modules round-trip.

def resident_bytes():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def kernel_calls(backend):
    """One forward or backward kernel call each, on 1024 values: an output leaked per call
    would be 40 MB over 10,000 calls."""
    rng = np.random.default_rng(5)
    f32 = np.float32
    x = rng.standard_normal((4, 16, 16)).astype(f32)
    dy = rng.standard_normal(x.shape).astype(f32)
    w, b = np.ones(16, f32), np.zeros(16, f32)
    rm, rv = np.zeros(16, f32), np.ones(16, f32)
    rows, row_dy = x.reshape(64, 16), dy.reshape(64, 16)
    _, bn_mean, bn_invstd = fastbn.batch_norm_forward(x, w, b, training=True, backend=backend)
    _, gn_mean, gn_rstd = fastbn.group_norm_forward(x, 4, w, b, backend=backend)
    _, in_mean, in_rstd = fastbn.instance_norm_forward(x, w, b, backend=backend)
    _, ln_mean, ln_rstd = fastbn.layer_norm_forward(rows, 16, w, b, backend=backend)
    _, rms_rstd = fastbn.rms_norm_forward(rows, 16, w, backend=backend)
    return [
        lambda: fastbn.batch_norm_forward(x, w, b, rm, rv, True, backend=backend),
        lambda: fastbn.batch_norm_forward(x, w, b, rm, rv, False, backend=backend),
        lambda: fastbn.batch_norm_backward(dy, x, w, bn_mean, bn_invstd, True, backend=backend),
        lambda: fastbn.group_norm_forward(x, 4, w, b, backend=backend),
        lambda: fastbn.group_norm_backward(dy, x, gn_mean, gn_rstd, w, 4, backend=backend),
        lambda: fastbn.instance_norm_forward(x, w, b, rm, rv, backend=backend),
        lambda: fastbn.instance_norm_backward(dy, x, in_mean, in_rstd, w, backend=backend),
        lambda: fastbn.layer_norm_forward(rows, 16, w, b, backend=backend),
        lambda: fastbn.layer_norm_backward(row_dy, rows, 16, ln_mean, ln_rstd, w, b,
                                           backend=backend),
        lambda: fastbn.rms_norm_forward(rows, 16, w, backend=backend),
        lambda: fastbn.rms_norm_backward(row_dy, rows, 16, rms_rstd, w, backend=backend),
        # Calls that raise, each on a path of its own, after some of the work.
        lambda: fastbn.batch_norm_forward(x, training=True, out=np.empty((4, 16, 15), f32),
                                          backend=backend),
        lambda: fastbn.group_norm_forward(x, 5, backend=backend),
        lambda: fastbn.layer_norm_backward(row_dy, rows, 16, ln_mean, ln_rstd, w[:8],
                                           backend=backend),
    ]


def module_calls(backend):
    """A training step (forward and backward) of each fastbn.nn module kind, an eval-mode
    forward, and calls that raise."""
    def step(module, shape):
        x = torch.randn(shape, requires_grad=True)
        return lambda: module(x).sum().backward()

    batch_norm = fnn.BatchNorm2d(16, backend=backend)
    evaluated = fnn.BatchNorm2d(16, backend=backend).eval()
    shape = (4, 16, 4, 4)
    return [step(batch_norm, shape), step(fnn.GroupNorm(4, 16, backend=backend), shape),
            step(fnn.InstanceNorm2d(16, affine=True, track_running_stats=True, backend=backend),
                 shape),
            step(fnn.LayerNorm(16, backend=backend), (64, 16)),
            step(fnn.RMSNorm(16, backend=backend), (64, 16)),
            lambda: evaluated(torch.randn(shape)),
            lambda: batch_norm(torch.ones(4, 15, 4, 4)),  # channels do not match
            lambda: fnn.functional.batch_norm(torch.ones(1, 16), None, None, training=True,
                                              backend=backend)]  # one value per channel


def resident_growth(calls, times=10_000):
    """How much resident memory grows over `times` calls of each of `calls` (raising ones
    included), after a warm-up in which caches, pools and lazy state settle."""
    def run(call, n):
        for _ in range(n):
            try:
                call()
            except (ValueError, TypeError, RuntimeError):
                pass
    for call in calls:
        run(call, 200)
    before = resident_bytes()
    for call in calls:
        run(call, times)
    return resident_bytes() - before


MAX_GROWTH = 8 << 20  # bytes; a leak of 1 KB per call would be 10 MB


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_memory_growth_over_10000_kernel_calls(backend):
    growth = resident_growth(kernel_calls(backend))
    assert growth < MAX_GROWTH, f"resident memory grew by {growth} bytes"


def test_no_memory_growth_over_10000_module_calls():
    """The module glue is the same for every backend: one is enough."""
    growth = resident_growth(module_calls(BACKENDS[0]))
    assert growth < MAX_GROWTH, f"resident memory grew by {growth} bytes"


@pytest.mark.parametrize("backend", BACKENDS)
def test_python_threads_calling_at_once_get_bit_identical_results(backend):
    """Four Python threads run every op at once, each on inputs of its own, while a fifth
    changes the thread count: each gets the results of a lone call, to the bit."""
    calls = [op_calls(backend, seed=seed) for seed in range(4)]
    expected = [{op: call() for op, call in thread_calls.items()} for thread_calls in calls]
    errors, done = [], threading.Event()

    def worker(index):
        try:
            for _ in range(3):
                for op, call in calls[index].items():
                    for got, want in zip(call(), expected[index][op]):
                        np.testing.assert_array_equal(got, want, err_msg=op)
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    def toggler():
        counts = [1, 2, None]
        while not done.is_set():
            for n in counts:
                fastbn.set_num_threads(n)

    workers = [threading.Thread(target=worker, args=(index,)) for index in range(4)]
    toggle = threading.Thread(target=toggler)
    try:
        toggle.start()
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join()
    finally:
        done.set()
        toggle.join()
        fastbn.set_num_threads(None)
    assert not errors, errors[0]


MODULES = {
    "BatchNorm1d": (lambda b: fnn.BatchNorm1d(5, momentum=None, backend=b), (4, 5, 3)),
    "BatchNorm2d": (lambda b: fnn.BatchNorm2d(5, backend=b), (2, 5, 3, 3)),
    "BatchNorm3d": (lambda b: fnn.BatchNorm3d(5, backend=b), (2, 5, 2, 3, 2)),
    "GroupNorm": (lambda b: fnn.GroupNorm(5, 10, backend=b), (2, 10, 3, 3)),
    "InstanceNorm1d": (lambda b: fnn.InstanceNorm1d(5, affine=True, track_running_stats=True,
                                                    backend=b), (2, 5, 7)),
    "InstanceNorm2d": (lambda b: fnn.InstanceNorm2d(5, track_running_stats=True, backend=b),
                       (2, 5, 3, 3)),
    "InstanceNorm3d": (lambda b: fnn.InstanceNorm3d(5, affine=True, backend=b),
                       (2, 5, 2, 3, 2)),
    "LayerNorm": (lambda b: fnn.LayerNorm((3, 4), backend=b), (2, 5, 3, 4)),
    "RMSNorm": (lambda b: fnn.RMSNorm(4, backend=b), (2, 5, 4)),
}


def copy_of(module, how):
    if how == "deepcopy":
        return copy.deepcopy(module)
    if how == "pickle":
        return pickle.loads(pickle.dumps(module))
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("name", MODULES)
def test_modules_round_trip_with_their_backend(backend, name, how):
    make, shape = MODULES[name]
    module = make(backend)
    for parameter in module.parameters():
        torch.nn.init.uniform_(parameter, 0.5, 1.5)
    module(torch.randn(shape))  # running statistics away from their initial values
    clone = copy_of(module, how)
    assert type(clone) is type(module) and clone.backend == backend
    torch.testing.assert_close(clone.state_dict(), module.state_dict(), rtol=0, atol=0)
    x = torch.randn(shape)
    torch.testing.assert_close(clone(x), module(x), rtol=0, atol=0)
    torch.testing.assert_close(clone.state_dict(), module.state_dict(), rtol=0, atol=0)
    # A state dict saved and loaded into another module keeps that module's backend.
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    other = make("numpy")
    other.load_state_dict(torch.load(buffer))
    assert other.backend == "numpy"
    torch.testing.assert_close(other.state_dict(), module.state_dict(), rtol=0, atol=0)


# ---------------------------------------------------------------------------
# Past 2^31 values (int32 index overflow): marked slow, 9-18 GB of memory.

BIG = 2 ** 31 + 2 ** 21


@pytest.mark.slow
@pytest.mark.parametrize("backend", THREADED_BACKENDS)
def test_batch_norm_over_more_than_2_31_values(backend):
    """BatchNorm over 2^31 + 2^21 float32 values (in place: 8.6 GB), each row its own scale:
    the statistics and the rows past index 2^31 are right."""
    N, C, S = 1025, 2, 2 ** 20
    assert N * C * S == BIG
    scale = (1 + np.arange(N) % 3).astype(np.float32)  # row n: +-scale[n], alternating in s
    sign = np.where(np.arange(S) % 2 == 0, 1, -1).astype(np.float32)
    x = np.empty((N, C, S), np.float32)
    for n in range(N):  # row by row: no temporary of the input's size
        x[n] = (np.arange(1, C + 1, dtype=np.float32)[:, None] * scale[n]) * sign
    running_mean, running_var = np.zeros(C, np.float32), np.ones(C, np.float32)
    y, mean, invstd = fastbn.batch_norm_forward(x, None, None, running_mean, running_var, True,
                                                1.0, 0.0, out=x, backend=backend)
    var = np.array([((c + 1) * scale.astype(np.float64)) ** 2 for c in range(C)]).mean(axis=1)
    np.testing.assert_allclose(mean, 0, atol=1e-6)
    np.testing.assert_allclose(invstd, 1 / np.sqrt(var), rtol=1e-6)
    np.testing.assert_allclose(running_var, var * N * S / (N * S - 1), rtol=1e-6)
    for n in (0, 1023, 1024, N - 1):  # row 1024 starts at index 2^31
        for c in range(C):
            expected = (c + 1) * scale[n] * sign / np.sqrt(var[c])
            np.testing.assert_allclose(y[n, c], expected, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("backend", THREADED_BACKENDS)
def test_layer_norm_past_index_2_31(backend):
    """LayerNorm over 2050 rows of 2^20 float32 values (in place: 8.6 GB), row r of mean r:
    every row's statistics and the rows past index 2^31 are right."""
    rows, D = 2050, 2 ** 20
    assert rows * D == BIG
    sign = np.where(np.arange(D) % 2 == 0, 1, -1).astype(np.float32)
    spread = (1 + np.arange(rows) % 5).astype(np.float32)
    x = np.empty((rows, D), np.float32)
    for r in range(rows):
        x[r] = r + spread[r] * sign
    y, mean, rstd = fastbn.layer_norm_forward(x, D, eps=0.0, out=x, backend=backend)
    np.testing.assert_allclose(mean[:, 0], np.arange(rows), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(rstd[:, 0], 1 / spread, rtol=1e-5)
    for r in (0, 2047, 2048, rows - 1):  # row 2048 starts at index 2^31
        np.testing.assert_allclose(y[r], sign, rtol=1e-4, atol=1e-4)
