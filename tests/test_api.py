"""The backend registry, the thread-count rule, their environment variables and
`python -m fastbn info`."""
import importlib
import importlib.util
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import fastbn
from fastbn._backends import BACKENDS, load_backend

REPOSITORY = Path(fastbn.__file__).resolve().parent.parent
MODULES = {"cython": "fastbn._cython", "numba": "fastbn._numba", "numpy": "fastbn._numpy"}


@pytest.fixture(autouse=True)
def restore_settings():
    """Each test leaves the settings as it found them. FASTBN_BACKEND and
    FASTBN_NUM_THREADS are read once per process, so tests of them run a new one."""
    yield
    fastbn.set_backend(None)
    fastbn.set_num_threads(None)


def run_python(*args, **environment):
    """Run `python *args` in a new process that imports this checkout's fastbn."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("FASTBN_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPOSITORY), env.get("PYTHONPATH")]))
    env.update(environment)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          cwd=REPOSITORY, timeout=300)


def other_backend(name):
    """An available backend other than `name`."""
    others = [other for other in fastbn.available_backends() if other != name]
    if not others:
        pytest.skip("only one backend is available")
    return others[0]


def small_input():
    return np.random.default_rng(0).standard_normal((4, 3, 5))


# ---------------------------------------------------------------------------
# Backends

def test_available_backends_lists_what_can_run_fastest_first():
    names = fastbn.available_backends()
    assert names == [name for name in BACKENDS if name in names]
    assert "numpy" in names
    cython_built = importlib.util.find_spec("fastbn._cython._batch_norm") is not None
    assert ("cython" in names) == cython_built
    assert ("numba" in names) == (importlib.util.find_spec("numba") is not None)


def test_every_available_backend_runs(backend):
    module = load_backend(backend)
    assert module is importlib.import_module(MODULES[backend])
    x = small_input()
    got = fastbn.batch_norm_forward(x, training=True, backend=backend)
    want = fastbn.batch_norm_forward(x, training=True, backend="numpy")
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_default_backend_is_the_fastest_available():
    assert fastbn.get_backend() == fastbn.available_backends()[0]


def test_set_backend_is_used_by_calls_without_backend(backend):
    fastbn.set_backend(backend)
    assert fastbn.get_backend() == backend
    assert load_backend() is importlib.import_module(MODULES[backend])
    x = small_input()
    implicit = fastbn.batch_norm_forward(x, training=True)
    explicit = fastbn.batch_norm_forward(x, training=True, backend=backend)
    for a, b in zip(implicit, explicit):
        assert a.tobytes() == b.tobytes()
    fastbn.set_backend(None)
    assert fastbn.get_backend() == fastbn.available_backends()[0]


def test_set_backend_overrides_the_environment():
    other = other_backend("numpy")
    result = run_python("-c", "import fastbn; print(fastbn.get_backend()); "
                              f"fastbn.set_backend({other!r}); print(fastbn.get_backend())",
                        FASTBN_BACKEND="numpy")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["numpy", other]


def test_empty_environment_variable_means_the_default():
    result = run_python("-c", "import fastbn; print(fastbn.get_backend())", FASTBN_BACKEND="")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == fastbn.available_backends()[0]


def enter_use_backend(name):
    with fastbn.use_backend(name):
        pass


@pytest.mark.parametrize("select", [fastbn.set_backend, enter_use_backend, load_backend])
def test_unknown_backend_is_an_error_that_changes_nothing(select):
    fastbn.set_backend("numpy")
    with pytest.raises(ValueError, match="unknown backend 'cuda'; expected one of cython, "
                                         "numba, numpy"):
        select("cuda")
    assert fastbn.get_backend() == "numpy"


def test_use_backend_restores_the_previous_one(backend):
    outer = other_backend(backend)
    fastbn.set_backend(outer)
    with fastbn.use_backend(backend) as name:
        assert name == backend and fastbn.get_backend() == backend
        with fastbn.use_backend(outer):
            assert fastbn.get_backend() == outer
        assert fastbn.get_backend() == backend
    assert fastbn.get_backend() == outer
    with pytest.raises(RuntimeError, match="inside the block"):
        with fastbn.use_backend(backend):
            raise RuntimeError("inside the block")
    assert fastbn.get_backend() == outer


def test_use_backend_applies_to_its_own_thread_only(backend):
    outer = other_backend(backend)
    fastbn.set_backend(outer)
    seen_elsewhere = []
    with fastbn.use_backend(backend):
        thread = threading.Thread(target=lambda: seen_elsewhere.append(fastbn.get_backend()))
        thread.start()
        thread.join()
        assert fastbn.get_backend() == backend
    assert seen_elsewhere == [outer]


def test_fastbn_backend_environment_variable():
    selected = run_python("-c", "import fastbn; from fastbn._backends import load_backend; "
                                "print(fastbn.get_backend(), load_backend().__name__)",
                          FASTBN_BACKEND="numpy")
    assert selected.returncode == 0, selected.stderr
    assert selected.stdout.split() == ["numpy", "fastbn._numpy"]

    unknown = run_python("-c", "import fastbn, numpy; "
                               "fastbn.batch_norm_forward(numpy.ones((2, 3)), training=True)",
                         FASTBN_BACKEND="cuda")
    assert unknown.returncode != 0
    assert "ValueError: unknown backend 'cuda'" in unknown.stderr


def test_missing_numba_makes_the_numba_backend_unavailable():
    # A None entry in sys.modules makes `import numba` fail, as when it is not installed.
    result = run_python("-c", "import sys; sys.modules['numba'] = None; import fastbn; "
                              "print(fastbn.available_backends()); fastbn.set_backend('numba')")
    assert "numba" not in result.stdout
    assert result.returncode != 0
    assert re.search(r"fastbn\._backends\.BackendUnavailableError: backend 'numba' is not "
                     r"available: it needs the numba package", result.stderr)


# ---------------------------------------------------------------------------
# Threads

def openmp_limit():
    """omp_get_max_threads() where fastbn was built with OpenMP, else None."""
    try:
        from fastbn._cython._openmp_helpers import openmp_enabled, openmp_max_threads
    except ImportError:
        return None
    return openmp_max_threads() if openmp_enabled() else None


def capped(n):
    """The documented rule: the requested count, capped by OpenMP's limit."""
    limit = openmp_limit()
    return n if limit is None else max(1, min(n, limit))


CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


@pytest.mark.parametrize("n, expected", [(1, 1), (2, 2), (3, 3), (-1, CPUS),
                                         (-2, max(1, CPUS - 1)), (-1000, 1)])
def test_set_num_threads(n, expected):
    fastbn.set_num_threads(n)
    assert fastbn.get_num_threads() == capped(expected)


def test_default_thread_count_is_the_available_cpus():
    assert fastbn.get_num_threads() == capped(CPUS)
    fastbn.set_num_threads(1)
    fastbn.set_num_threads(None)
    assert fastbn.get_num_threads() == capped(CPUS)


@pytest.mark.parametrize("n, message", [
    (0, r"set_num_threads\(n\) must not be 0: use a positive count, or a negative one that "
        r"counts back from the available CPUs \(-1 = all of them"),
    ("two", r"set_num_threads\(n\) must be an integer, a positive count, .*; got 'two'"),
    (2.5, r"set_num_threads\(n\) must be an integer, .*; got 2.5"),  # not truncated to 2
])
def test_bad_thread_count_is_an_error_that_changes_nothing(n, message):
    fastbn.set_num_threads(1)
    with pytest.raises(ValueError, match=message):
        fastbn.set_num_threads(n)
    assert fastbn.get_num_threads() == 1


def test_set_num_threads_overrides_the_environment():
    result = run_python("-c", "import fastbn; print(fastbn.get_num_threads()); "
                              "fastbn.set_num_threads(-1); print(fastbn.get_num_threads())",
                        FASTBN_NUM_THREADS="1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", str(capped(CPUS))]


def thread_count_in_new_process(**environment):
    result = run_python("-c", "import fastbn; print(fastbn.get_num_threads())", **environment)
    return result.stdout.strip() if result.returncode == 0 else result.stderr


@pytest.mark.parametrize("value, expected", [
    ("1", 1), ("3", 3), ("-1", CPUS), ("-2", max(1, CPUS - 1)), (str(-CPUS), 1),
    (str(-CPUS - 5), 1), ("", CPUS)])  # below -CPUS: 1; empty: as if unset
def test_fastbn_num_threads_environment_variable(value, expected):
    """The rule of set_num_threads: negative counts back from the CPUs, -1 = all."""
    assert thread_count_in_new_process(FASTBN_NUM_THREADS=value) == str(capped(expected))


@pytest.mark.parametrize("value, message", [
    ("0", "ValueError: FASTBN_NUM_THREADS must not be 0: use a positive count"),
    ("all", "ValueError: FASTBN_NUM_THREADS must be an integer, a positive count, or a "
            "negative one that counts back from the available CPUs (-1 = all of them, -2 = "
            "all but one, ...; never fewer than 1); got 'all'"),
    ("1.5", "ValueError: FASTBN_NUM_THREADS must be an integer"),
])
def test_fastbn_num_threads_that_is_not_a_count_is_an_error(value, message):
    assert message in thread_count_in_new_process(FASTBN_NUM_THREADS=value)


def test_omp_num_threads_caps_the_count():
    if openmp_limit() is None:
        pytest.skip("fastbn is built without OpenMP")
    assert thread_count_in_new_process(FASTBN_NUM_THREADS="2", OMP_NUM_THREADS="1") == "1"


# ---------------------------------------------------------------------------
# Command line

def test_info_command_reports_backends_openmp_and_threads():
    result = run_python("-m", "fastbn", "info", FASTBN_NUM_THREADS="1", FASTBN_BACKEND="numpy")
    assert result.returncode == 0, result.stderr
    report = result.stdout
    assert f"fastbn {fastbn.__version__}" in report
    for name in BACKENDS:
        status = "available" if name in fastbn.available_backends() else "unavailable: "
        assert re.search(rf"^backend {name} +{status}", report, re.MULTILINE), name
    assert "default backend: numpy" in report
    assert re.search(r"^threads: 1$", report, re.MULTILINE)
    if "cython" in fastbn.available_backends():
        openmp = "on" if openmp_limit() is not None else "off"
        assert re.search(rf"^OpenMP: {openmp} \(", report, re.MULTILINE)


def test_bench_command_without_torch_says_what_is_missing():
    # A None entry in sys.modules makes `import torch` fail, as when it is not installed.
    result = run_python("-c", "import sys; sys.modules['torch'] = None; "
                              "from fastbn.__main__ import main; sys.exit(main(['bench']))")
    assert result.returncode == 2
    assert "pip install torch==2.13.0" in result.stderr


def test_threads_follow_torch_under_fastbn_nn():
    """With fastbn.nn imported, torch.set_num_threads sets fastbn's default count;
    fastbn.set_num_threads (or FASTBN_NUM_THREADS) takes precedence, below OpenMP's limit
    (which torch's set_num_threads also sets where both load GNU libgomp)."""
    code = ("import torch, fastbn, fastbn.nn\n"
            "torch.set_num_threads(1); print(fastbn.get_num_threads())\n"
            "torch.set_num_threads(2); print(fastbn.get_num_threads())\n"
            "fastbn.set_num_threads(1); print(fastbn.get_num_threads())\n")
    result = run_python("-c", code)
    assert result.stdout.split() == ["1", str(min(2, CPUS)), "1"]
    result = run_python("-c", code, FASTBN_NUM_THREADS="1")
    assert result.stdout.split() == ["1", "1", "1"]


def test_threads_are_chosen_by_the_work():
    """The rule every Cython kernel applies (docs/design.md): never more threads than asked
    for, never more than one per MIN_VALUES_PER_THREAD values or per work item, at least 1."""
    helpers = pytest.importorskip("fastbn._cython._openmp_helpers")
    per_thread = helpers.MIN_VALUES_PER_THREAD
    assert helpers.threads_for_work(16, 100 * per_thread, 1000) == 16
    assert helpers.threads_for_work(4, 100 * per_thread, 1000) == 4
    assert helpers.threads_for_work(16, 3 * per_thread, 1000) == 3
    assert helpers.threads_for_work(16, 3 * per_thread + per_thread - 1, 1000) == 3
    assert helpers.threads_for_work(16, 100 * per_thread, 5) == 5
    assert helpers.threads_for_work(16, per_thread - 1, 1000) == 1
    assert helpers.threads_for_work(16, 0, 0) == 1
