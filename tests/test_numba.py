"""What only the Numba backend does: lazy import, the missing-package error, numba's
thread setting, the kernels' Python run with the JIT off, and thread-count independence.

Correctness for every backend lives in test_batch_norm.py (the `backend` fixture)."""
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastbn
from conftest import tolerance

try:
    import numba
except ImportError:  # the tests that need it are skipped; the missing-numba one still runs
    numba = None
needs_numba = pytest.mark.skipif(numba is None, reason="numba is not installed")
needs_two_numba_threads = pytest.mark.skipif(
    numba is None or numba.config.NUMBA_NUM_THREADS < 2, reason="needs numba with 2 threads")

REPO_ROOT = pathlib.Path(fastbn.__file__).resolve().parent.parent


def run_python(code, **env):
    """Run `code` in a fresh interpreter that imports this checkout's fastbn; return stdout."""
    environment = dict(os.environ, **env)
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                            text=True, env=environment, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def channels_last(a):
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1)


@needs_numba
def test_importing_fastbn_does_not_import_numba():
    out = run_python("""
        import sys
        import numpy as np
        import fastbn
        loaded_on_import = "numba" in sys.modules
        x = np.random.default_rng(0).standard_normal((4, 3, 5)).astype(np.float32)
        for name in fastbn.available_backends():
            if name != "numba":
                fastbn.batch_norm_forward(x, training=True, backend=name)
        print(loaded_on_import, "numba" in sys.modules)
        fastbn.batch_norm_forward(x, training=True, backend="numba")
        print("numba" in sys.modules)
    """)
    assert out.split() == ["False", "False", "True"]


@needs_numba
def test_a_call_loads_the_kernels_of_its_op_only():
    """Loading kernels costs about 0.2 s per op in a new process: only the op used pays."""
    out = run_python("""
        import sys
        import numpy as np
        import fastbn
        x = np.random.default_rng(0).standard_normal((4, 3, 5)).astype(np.float32)
        fastbn.batch_norm_forward(x, training=True, backend="numba")
        print(*(f"fastbn._numba.{op}" in sys.modules
                for op in ("batch_norm", "group_norm", "layer_norm")))
        fastbn.layer_norm_forward(x, 5, backend="numba")
        print("fastbn._numba.layer_norm" in sys.modules)
    """)
    assert out.split() == ["True", "False", "False", "True"]


def test_missing_numba_names_the_package_and_other_backends_work():
    # sys.modules["numba"] = None is how Python marks a module as not importable:
    # `import numba` then raises ModuleNotFoundError, as on a machine without it.
    out = run_python("""
        import sys
        sys.modules["numba"] = None
        import numpy as np
        import fastbn
        print(",".join(fastbn.available_backends()))
        x = np.random.default_rng(0).standard_normal((4, 3, 5))
        y_numpy = fastbn.batch_norm_forward(x, training=True, backend="numpy")[0]
        for name in fastbn.available_backends():
            y = fastbn.batch_norm_forward(x, training=True, backend=name)[0]
            assert np.allclose(y, y_numpy), name
        for use in (lambda: fastbn.batch_norm_forward(x, training=True, backend="numba"),
                    lambda: fastbn.set_backend("numba")):
            try:
                use()
            except fastbn.BackendUnavailableError as exc:
                print(exc)
            else:
                raise AssertionError("no error without numba")
    """)
    backends, *messages = out.strip().splitlines()
    assert "numba" not in backends.split(",") and "numpy" in backends.split(",")
    assert len(messages) == 2
    for message in messages:
        assert "numba" in message and "pip install numba" in message


@pytest.fixture
def restore_threads():
    numba_before = numba.get_num_threads()
    yield
    fastbn.set_num_threads(None)
    numba.set_num_threads(numba_before)


@needs_two_numba_threads
@pytest.mark.parametrize("fastbn_threads,numba_threads", [(1, 2), (2, 1)])
def test_a_call_restores_numba_thread_count(restore_threads, rng, fastbn_threads, numba_threads):
    # Big enough that the kernels use fastbn_threads threads, not one.
    x = rng.standard_normal((4, 8, 64, 64)).astype(np.float32)
    fastbn.set_num_threads(fastbn_threads)
    numba.set_num_threads(numba_threads)
    y, mean, invstd = fastbn.batch_norm_forward(x, training=True, backend="numba")
    assert numba.get_num_threads() == numba_threads
    fastbn.batch_norm_backward(x, x, None, mean, invstd, True, backend="numba")
    assert numba.get_num_threads() == numba_threads


@needs_two_numba_threads
def test_thread_setting_is_restored_when_the_block_raises(restore_threads):
    from fastbn._numba._runtime import numba_threads

    numba.set_num_threads(2)
    with pytest.raises(KeyError):
        with numba_threads(1):
            assert numba.get_num_threads() == 1
            raise KeyError("inside the block")
    assert numba.get_num_threads() == 2


@needs_numba
def test_thread_count_is_capped_by_numba_pool(restore_threads):
    from fastbn._numba._runtime import numba_threads

    with numba_threads(numba.config.NUMBA_NUM_THREADS + 3):
        assert numba.get_num_threads() == numba.config.NUMBA_NUM_THREADS


def both_passes(x, training, threads=None, backend="numba"):
    """Forward and backward with weight, bias and running statistics; every result."""
    C = x.shape[1]
    rng = np.random.default_rng(7)
    weight, bias = rng.standard_normal(C).astype(x.dtype), rng.standard_normal(C).astype(x.dtype)
    running_mean = rng.standard_normal(C).astype(x.dtype)
    running_var = rng.uniform(0.5, 2, C).astype(x.dtype)
    grad_out = rng.standard_normal(x.shape).astype(x.dtype)
    if threads is not None:
        fastbn.set_num_threads(threads)
    y, mean, invstd = fastbn.batch_norm_forward(x, weight, bias, running_mean, running_var,
                                                training, backend=backend)
    grads = fastbn.batch_norm_backward(grad_out, x, weight, mean, invstd, training,
                                       backend=backend)
    return (y, mean, invstd, running_mean, running_var) + grads


# channels-first: short rows, and rows cut into several chunks (S > 4096);
# channels-last: one and several channel blocks (C > 256), and 2-D input.
SHAPES = [(3, 5, 7, 9), (1, 2, 90, 100), (2, 300, 4, 5), (6, 13), (2, 3, 2, 3, 4)]


@needs_numba
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False])
def test_matches_reference(rng, dtype, shape, layout, training):
    # A large mean: the pivot shift keeps float32 statistics accurate.
    x = (rng.standard_normal(shape) * 2 + 50).astype(dtype)
    if layout == "channels_last":
        x = channels_last(x)
    for got, want in zip(both_passes(x, training), both_passes(x, training, backend="numpy")):
        np.testing.assert_allclose(got, want, **tolerance(dtype))


@needs_two_numba_threads
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_same_bits_for_one_and_two_threads(restore_threads, rng, layout):
    x = rng.standard_normal((3, 300, 17, 19)).astype(np.float32)
    if layout == "channels_last":
        x = channels_last(x)
    one = both_passes(x, True, threads=1)
    two = both_passes(x, True, threads=2)
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)


@needs_numba
def test_read_only_and_strided_arrays_reach_the_kernels(rng):
    # The compiled signatures take read-only inputs and a strided running mean
    # (updated in place); eval mode accepts read-only running statistics.
    C = 6
    x = rng.standard_normal((4, C, 5, 5)).astype(np.float32)
    running_mean_memory = np.zeros(2 * C, np.float32)
    results = {}
    for backend in ("numba", "numpy"):
        running_mean = running_mean_memory.copy()[::2]
        running_var = np.ones(C, np.float32)
        weight = np.linspace(0.5, 1.5, C).astype(np.float32)
        for a in (x, weight):
            a.flags.writeable = False
        y_train, mean, invstd = fastbn.batch_norm_forward(
            x, weight, None, running_mean, running_var, True, backend=backend)
        running_mean.flags.writeable = False
        running_var.flags.writeable = False
        y_eval = fastbn.batch_norm_forward(x, weight, None, running_mean, running_var, False,
                                           backend=backend)[0]
        grads = fastbn.batch_norm_backward(x, x, weight, mean, invstd, True, backend=backend)
        results[backend] = (y_train, y_eval, running_mean, running_var) + grads
    for got, want in zip(results["numba"], results["numpy"]):
        np.testing.assert_allclose(got, want, **tolerance(np.float32))


@needs_numba
def test_kernels_python_with_jit_disabled():
    # NUMBA_DISABLE_JIT=1 runs the kernels as plain Python (prange is range), so
    # this covers their source line by line, against the NumPy reference.
    out = run_python("""
        import itertools
        import types
        import numpy as np
        import fastbn
        from fastbn import _activations
        from fastbn._numba import batch_norm
        assert isinstance(batch_norm._kernel[np.dtype(np.float64)],
                          types.FunctionType)  # not compiled
        # Small inputs on two threads too, for the parallel branches (prange is range here).
        batch_norm.MIN_ELEMENTS_PER_THREAD = 1

        def channels_last(a):
            return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1)

        def both_passes(x, weight, training, eps, backend, mask):
            C = x.shape[1]
            running_mean, running_var = np.linspace(-1, 1, C), np.linspace(0.5, 2, C)
            # Read-only running statistics are fine where they are only read.
            running_mean.flags.writeable = running_var.flags.writeable = training
            grad_out = np.random.default_rng(1).standard_normal(x.shape)
            with np.errstate(all="ignore"):
                y, mean, invstd = fastbn.batch_norm_forward(
                    x, weight, None, running_mean, running_var, training, eps=eps,
                    backend=backend)
                grads = fastbn.batch_norm_backward(grad_out, x, weight, mean, invstd, training,
                                                   output_mask=mask, backend=backend)
            return [y, mean, invstd, running_mean, running_var] + list(grads)

        rng = np.random.default_rng(0)
        checked = 0
        variants = [(0.0, False, (True, True, True)), (1e-5, True, (True, False, False)),
                    (1e-5, False, (False, True, True))]  # (eps, weighted, output_mask)
        for shape in [(2, 3, 4, 5), (2, 300, 3), (1, 2, 4100 * 2), (5, 4)]:
            x = rng.standard_normal(shape) + 3
            x[:, 1] = 2.0  # a constant channel: with eps = 0, invstd 0
            x.reshape(shape[0], shape[1], -1)[-1, 0, -1] = np.nan  # channel 0 turns nan
            for threads, layout, training, (eps, weighted, mask) in itertools.product(
                    [1, 2], ["contiguous", "channels_last"], [True, False], variants):
                fastbn.set_num_threads(threads)
                data = channels_last(x) if layout == "channels_last" else x
                weight = np.linspace(0.5, 2, shape[1]) if weighted else None
                got = both_passes(data, weight, training, eps, "numba", mask)
                want = both_passes(data, weight, training, eps, "numpy", mask)
                for a, b in zip(got, want):
                    assert (a is None) == (b is None)
                    if a is not None:
                        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)
                        checked += 1
        # The fused activations (a kernel of their own), on every work split: short
        # rows, long rows cut in chunks, channels-last with one and two channel blocks.
        for shape, activations in [((2, 3, 4, 5), _activations.ACTIVATIONS),
                                   ((2, 300, 3), ("relu", "silu")), ((1, 2, 4100), ("relu6",))]:
            x = rng.standard_normal(shape) + 0.5
            C = shape[1]
            weight, bias = np.linspace(0.5, 2, C), np.linspace(-1, 1, C)
            grad_y = rng.standard_normal(shape)
            for act, threads, layout, training in itertools.product(
                    activations, [1, 2], ["contiguous", "channels_last"], [True, False]):
                fastbn.set_num_threads(threads)
                data = channels_last(x) if layout == "channels_last" else x
                results = []
                for backend in ("numba", "numpy"):
                    running_mean, running_var = np.zeros(C), np.ones(C)
                    y, mean, invstd = fastbn.batch_norm_forward(
                        data, weight, bias, running_mean, running_var, training,
                        activation=act, negative_slope=0.2, backend=backend)
                    results.append((y,) + fastbn.batch_norm_backward(
                        grad_y, data, weight, mean, invstd, training, activation=act,
                        bias=bias, negative_slope=0.2, backend=backend))
                for a, b in zip(*results):
                    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)
                    checked += 1
        print(checked)
    """, NUMBA_DISABLE_JIT="1")
    assert int(out) > 0


@needs_numba
def test_norm_kernels_python_with_jit_disabled():
    # As above, for the GroupNorm kernels (also InstanceNorm's) and the LayerNorm /
    # RMSNorm ones. The shapes reach every work split: whole groups; per-row chunks
    # of short and of long rows (S > 4096); channels-last tiles; LayerNorm's whole
    # rows and few long rows (D > 4096).
    out = run_python("""
        import itertools
        import types
        import numpy as np
        import fastbn
        from fastbn._numba import group_norm, layer_norm
        assert isinstance(group_norm._kernel[np.dtype(np.float64)], types.FunctionType)
        assert isinstance(layer_norm._kernel[np.dtype(np.float64)], types.FunctionType)
        # Small inputs on two threads too, for the parallel branches (prange is range here).
        group_norm.MIN_ELEMENTS_PER_THREAD = layer_norm.MIN_ELEMENTS_PER_THREAD = 1

        def channels_last(a):
            return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1)

        def group_passes(x, groups, weight, bias, mask, backend):
            y, mean, rstd = fastbn.group_norm_forward(x, groups, weight, bias, backend=backend)
            grad_out = np.random.default_rng(1).standard_normal(x.shape)
            grads = fastbn.group_norm_backward(grad_out, x, mean, rstd, weight, groups,
                                               output_mask=mask, backend=backend)
            return [y, mean, rstd] + list(grads)

        def instance_passes(x, weight, bias, mask, backend):
            C = x.shape[1]
            running_mean, running_var = np.linspace(-1, 1, C), np.linspace(0.5, 2, C)
            results = []
            for use_input_stats in (True, False):
                y, mean, rstd = fastbn.instance_norm_forward(
                    x, weight, bias, running_mean, running_var, use_input_stats,
                    backend=backend)
                grads = fastbn.instance_norm_backward(x, x, mean, rstd, weight,
                                                      use_input_stats, output_mask=mask,
                                                      backend=backend)
                results += [y, mean, rstd, running_mean.copy(), running_var.copy()]
                results += list(grads)
            return results

        def row_passes(x, D, weight, bias, mask, backend):
            grad_out = np.random.default_rng(2).standard_normal(x.shape)
            y, mean, rstd = fastbn.layer_norm_forward(x, (D,), weight, bias, backend=backend)
            grads = fastbn.layer_norm_backward(grad_out, x, (D,), mean, rstd, weight, bias,
                                               output_mask=mask, backend=backend)
            y_rms, rstd_rms = fastbn.rms_norm_forward(x, (D,), weight, 1e-6, backend=backend)
            grads_rms = fastbn.rms_norm_backward(grad_out, x, (D,), rstd_rms, weight,
                                                 output_mask=mask[:2], backend=backend)
            return [y, mean, rstd, y_rms, rstd_rms] + list(grads) + list(grads_rms)

        def check(got, want):
            assert len(got) == len(want)
            for a, b in zip(got, want):
                assert (a is None) == (b is None)
                if a is not None:
                    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)
            return sum(a is not None for a in got)

        rng = np.random.default_rng(0)
        checked = 0
        masks = [(True, True, True), (True, False, False), (False, True, True)]
        # (shape, groups): whole groups; short-row chunks; long-row chunks.
        for shape, groups in [((4, 8, 3, 3), 4), ((1, 6, 5), 2), ((1, 2, 4100), 1)]:
            x = rng.standard_normal(shape) + 3
            for threads, layout, affine, mask in itertools.product(
                    [1, 2], ["contiguous", "channels_last"], [True, False], masks):
                fastbn.set_num_threads(threads)
                data = channels_last(x) if layout == "channels_last" else x
                C = shape[1]
                weight = np.linspace(0.5, 2, C) if affine else None
                bias = np.linspace(-1, 1, C) if affine else None
                checked += check(group_passes(data, groups, weight, bias, mask, "numba"),
                                 group_passes(data, groups, weight, bias, mask, "numpy"))
                checked += check(instance_passes(data, weight, bias, mask, "numba"),
                                 instance_passes(data, weight, bias, mask, "numpy"))
        # (rows, D): whole rows; few long rows cut into chunks.
        for rows, D in [(70, 5), (3, 4100)]:
            x = rng.standard_normal((rows, D)) + 3
            for threads, affine, mask in itertools.product([1, 2], [True, False], masks):
                fastbn.set_num_threads(threads)
                weight = np.linspace(0.5, 2, D) if affine else None
                bias = np.linspace(-1, 1, D) if affine else None
                checked += check(row_passes(x, D, weight, bias, mask, "numba"),
                                 row_passes(x, D, weight, bias, mask, "numpy"))
        print(checked)
    """, NUMBA_DISABLE_JIT="1")
    assert int(out) > 0


def _forward_backward(op, x, grad_out, eps, backend):
    """Every result of `op`'s forward, and of its backward unless grad_out is None
    (parameters 1 and 0: None)."""
    shape = x.shape[2:]
    if op == "batch_norm":
        y, mean, rstd = fastbn.batch_norm_forward(x, training=True, eps=eps, backend=backend)
    elif op == "group_norm":
        y, mean, rstd = fastbn.group_norm_forward(x, 2, eps=eps, backend=backend)
    elif op == "layer_norm":
        y, mean, rstd = fastbn.layer_norm_forward(x, shape, eps=eps, backend=backend)
    else:
        (y, rstd), mean = fastbn.rms_norm_forward(x, shape, eps=eps, backend=backend), None
    if grad_out is None:
        return y, mean, rstd
    if op == "batch_norm":
        grads = fastbn.batch_norm_backward(grad_out, x, None, mean, rstd, True, backend=backend)
    elif op == "group_norm":
        grads = fastbn.group_norm_backward(grad_out, x, mean, rstd, None, 2, backend=backend)
    elif op == "layer_norm":
        grads = fastbn.layer_norm_backward(grad_out, x, shape, mean, rstd, backend=backend)
    else:
        grads = fastbn.rms_norm_backward(grad_out, x, shape, rstd, backend=backend)
    return (y, mean, rstd) + grads


@needs_numba
@pytest.mark.parametrize("magnitude, eps, backward", [
    (1e19, 1e-5, True),  # squares overflow float32 (above 3.4e38)
    (1e-20, 1e-5, True),
    # Squares of 1e-44 are subnormal floats of a few bits. With eps = 0 the variance
    # matters; the backward's coefficients (rstd**2 ~ 1e44) overflow float32 in every
    # backend then, so only the forward is compared.
    (1e-22, 0.0, False),
])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("op", ["batch_norm", "group_norm", "layer_norm", "rms_norm"])
def test_huge_and_tiny_float32_values(rng, op, layout, magnitude, eps, backward):
    """float32 data of huge and tiny magnitude: the float64 reference's results, to float32
    precision (the float32 block sums of squares are redone in float64 where they leave
    float32's normal range). Runs of 49 values, and long rows (several sum blocks)."""
    if layout == "channels_last" and op in ("layer_norm", "rms_norm"):
        pytest.skip("LayerNorm and RMSNorm take the (rows, D) view of any layout")
    for shape in [(2, 4, 7, 7), (1, 2, 40, 60)]:
        x = ((rng.standard_normal(shape) + 0.5) * magnitude).astype(np.float32)
        if layout == "channels_last":
            x = channels_last(x)
        grad_out = rng.standard_normal(shape).astype(np.float32) if backward else None
        got = _forward_backward(op, x, grad_out, eps, "numba")
        want = _forward_backward(op, x.astype(np.float64),
                                 None if grad_out is None else grad_out.astype(np.float64), eps,
                                 "numpy")
        for a, b in zip(got, want):
            if a is not None:
                scale = float(np.max(np.abs(b)))
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale)


@needs_two_numba_threads
def test_every_op_runs_in_a_forked_child_on_one_thread():
    """After a two-thread call, numba's OpenMP layer stops a forked child that starts a
    parallel region ("fork() called from a process already using GNU OpenMP"): on one
    thread every numba op must run without one. Forward and backward of each op, both
    layouts, in a child of a process that used two threads; a hang fails on the timeout."""
    out = run_python("""
        import os
        import signal
        import time
        import numpy as np
        import fastbn

        rng = np.random.default_rng(0)

        def channels_last(a):
            return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1)

        def every_op(x):
            C, D = x.shape[1], x.shape[-1]
            g = np.ones_like(x)
            w = np.ones(C, x.dtype)
            y, m, i = fastbn.batch_norm_forward(x, w, w, training=True, backend="numba")
            fastbn.batch_norm_backward(g, x, w, m, i, True, backend="numba")
            y, m, i = fastbn.batch_norm_forward(x, w, w, training=True, activation="relu",
                                                backend="numba")
            fastbn.batch_norm_backward(g, x, w, m, i, True, activation="relu", bias=w,
                                       backend="numba")
            y, m, r = fastbn.group_norm_forward(x, 4, w, w, backend="numba")
            fastbn.group_norm_backward(g, x, m, r, w, 4, backend="numba")
            y, m, r = fastbn.instance_norm_forward(x, w, w, backend="numba")
            fastbn.instance_norm_backward(g, x, m, r, w, True, backend="numba")
            if x.flags.c_contiguous:
                y, m, r = fastbn.layer_norm_forward(x, D, backend="numba")
                fastbn.layer_norm_backward(g, x, D, m, r, backend="numba")
                y, r = fastbn.rms_norm_forward(x, D, backend="numba")
                fastbn.rms_norm_backward(g, x, D, r, backend="numba")

        # Big enough for two threads (16384 values per thread at least).
        inputs = [rng.standard_normal((4, 16, 32, 32)).astype(np.float32)]
        inputs.append(channels_last(inputs[0]))
        fastbn.set_num_threads(2)
        for x in inputs:
            every_op(x)
        pid = os.fork()
        if pid == 0:
            fastbn.set_num_threads(1)
            for x in inputs:
                every_op(x)
            os._exit(0)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                print(os.waitstatus_to_exitcode(status))
                break
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            print("timeout")
    """, NUMBA_NUM_THREADS="2")
    assert out.split() == ["0"]


@needs_numba
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_row_kernels_take_missing_parameters_and_out_x_without_data_sized_temporaries(op):
    """LayerNorm / RMSNorm kernels with weight and bias None and y = x (in place) on one
    long row: the peak memory grows by far less than the data (a weight of ones would
    double it), and the result is the reference's. Nothing big is freed before the
    kernel runs, so that the peak before it is the memory in use."""
    out = run_python(f"""
        import resource
        import numpy as np
        from fastbn import _numpy
        from fastbn._numba import layer_norm

        def peak_bytes():
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

        def forward(kernels, x, dtype):
            stats = [np.empty(1, dtype) for _ in range(2)]
            if "{op}" == "layer_norm":
                kernels.layer_norm_forward(x, None, None, 1e-5, x, stats[0], stats[1], 1)
            else:
                kernels.rms_norm_forward(x, None, 1e-5, x, stats[1], 1)

        forward(layer_norm, np.ones((1, 64), np.float32), np.float32)  # compiles or loads
        x = np.random.default_rng(0).standard_normal((1, 1 << 24), np.float32)  # 64 MB
        x += 3
        want = x.astype(np.float64)
        before = peak_bytes()
        forward(layer_norm, x, np.float32)
        grown = peak_bytes() - before
        forward(_numpy, want, np.float64)
        assert np.allclose(x, want, rtol=1e-5, atol=1e-5)
        print(grown / x.nbytes)
    """)
    assert float(out) < 0.1


@needs_numba
def test_precompile_makes_every_entry_point_ready():
    # With the JIT off the "compiled" kernels are the Python functions: this checks that
    # precompile finds each op's entry points (BatchNorm's two, GroupNorm's, LayerNorm's).
    out = run_python("""
        import types
        import numpy as np
        from fastbn._numba import batch_norm, group_norm, layer_norm, precompile
        print(precompile(("float32",)))
        for kernel in (batch_norm._kernel, batch_norm._fused_kernel, group_norm._kernel,
                       layer_norm._kernel):
            assert isinstance(kernel._compiled[np.dtype(np.float32)], types.FunctionType)
    """, NUMBA_DISABLE_JIT="1")
    assert out.split() == ["4"]
