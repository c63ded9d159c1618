"""Command line: ``python -m fastbn info`` (also installed as the ``fastbn`` command)."""
import argparse
import platform
import sys


def info():
    import numpy

    import fastbn
    from fastbn._backends import BACKENDS, _why_unavailable

    print(f"fastbn {fastbn.__version__}")
    print(f"python {platform.python_version()}, numpy {numpy.__version__}, "
          f"{platform.machine()} {platform.system()}")
    for name in BACKENDS:
        reason = _why_unavailable(name)
        print(f"backend {name:7s} {'available' if reason is None else 'unavailable: ' + reason}")
    print(f"default backend: {fastbn.get_backend()}")
    try:
        from fastbn._cython import _build_info
    except ImportError:
        print("compiled kernels: not built")
    else:
        print(f"OpenMP: {'on' if _build_info.OPENMP else 'off'} ({_build_info.OPENMP_REASON})")
        print(f"compiler: {_build_info.COMPILER}")
        print(f"compile flags: {_build_info.PYTHON_CFLAGS} {_build_info.EXTRA_COMPILE_ARGS}")
    print(f"threads: {fastbn.get_num_threads()}")
    try:
        import numba
        print(f"numba {numba.__version__}")
    except ImportError:
        print("numba: not installed")
    try:
        import torch
        print(f"torch {torch.__version__} (threads {torch.get_num_threads()})")
    except ImportError:
        print("torch: not installed")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fastbn", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="version, backends, OpenMP, threads and compiler flags")
    args = parser.parse_args(argv)
    if args.command == "info":
        info()
    return 0


if __name__ == "__main__":
    sys.exit(main())
