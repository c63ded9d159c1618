"""Backend registry: which implementation runs a call.

Every backend is a module with the same kernel functions (see
fastbn/_numpy/__init__.py for the reference and the calling convention).
Backends are imported on first use, so importing fastbn compiles nothing.
FASTBN_BACKEND is read once, on first use.
"""
import contextlib
import contextvars
import importlib
import importlib.util
import os

BACKENDS = ("cython", "numba", "numpy")

_MODULES = {"cython": "fastbn._cython", "numba": "fastbn._numba", "numpy": "fastbn._numpy"}
_loaded = {}
_global_backend = None  # set_backend(name); None means the default
_backend_override = contextvars.ContextVar("fastbn_backend_override", default=None)


class BackendUnavailableError(ImportError):
    """The requested backend cannot be used in this installation."""


def _why_unavailable(name):
    """None when `name` can be used, else a sentence that says why not."""
    if name == "numpy":
        return None
    if name == "cython":
        try:
            importlib.import_module("fastbn._cython._batch_norm")
        except ImportError as exc:
            return (f"the compiled extension is not built ({exc}); reinstall with "
                    "`pip install .` (or `pip install -e .`) on a machine with a C compiler")
        except ValueError as exc:  # a bad FASTBN_SIMD, found when the kernels load
            return str(exc)
        return None
    if name == "numba":
        if importlib.util.find_spec("numba") is None:
            return ("it needs the numba package: `pip install numba` "
                    "(or `pip install fastbn[numba]`)")
        return None
    return None


def available_backends():
    """Names of the backends this installation can run, fastest first."""
    return [name for name in BACKENDS if _why_unavailable(name) is None]


def _check_name(name):
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")


_default = None  # FASTBN_BACKEND, else the fastest available; found on first use


def _default_backend():
    global _default
    if _default is None:
        env = os.environ.get("FASTBN_BACKEND")
        if env:
            _check_name(env)
            _default = env
        else:
            _default = available_backends()[0]
    return _default


def set_backend(name):
    """Set the backend used when a call does not pass `backend=` (None restores the default)."""
    global _global_backend
    if name is not None:
        load_backend(name)  # fail now, not at the next call
    _global_backend = name


def get_backend():
    """The backend a call without `backend=` uses here and now."""
    return _backend_override.get() or _global_backend or _default_backend()


@contextlib.contextmanager
def use_backend(name):
    """Context manager: use backend `name` inside the block (this thread / task only)."""
    load_backend(name)
    token = _backend_override.set(name)
    try:
        yield name
    finally:
        _backend_override.reset(token)


def load_backend(name=None):
    """The kernel module of backend `name` (the current one when None)."""
    if name is None:
        name = get_backend()
    module = _loaded.get(name)
    if module is not None:
        return module
    _check_name(name)
    reason = _why_unavailable(name)
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} is not available: {reason}")
    module = importlib.import_module(_MODULES[name])
    _loaded[name] = module
    return module
