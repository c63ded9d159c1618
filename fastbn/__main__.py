"""Command line (also installed as the ``fastbn`` command).

    python -m fastbn info     version, backends, OpenMP, threads, compiler flags
    python -m fastbn bench    every backend against PyTorch (`bench --help` for options)
    python -m fastbn docs     the figures of docs/ and the README, from docs/benchmarks/*.json
    python -m fastbn study    the small-batch study (`study --help`; docs/study.md)
"""
import argparse
import os
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
        from fastbn import _simd

        limit = os.environ.get("FASTBN_SIMD")
        print(f"instruction sets (FASTBN_SIMD={limit!r}):" if limit else "instruction sets:")
        try:
            for ops, name in _simd.instruction_sets().items():
                print(f"  {ops}: {name}")
        except ValueError as exc:
            print(f"  {exc}")
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
    parser = argparse.ArgumentParser(prog="fastbn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="version, backends, OpenMP, threads and compiler flags")
    commands.add_parser("bench", add_help=False,
                        help="compare every backend with PyTorch (needs torch)")
    commands.add_parser("docs", add_help=False,
                        help="regenerate the figures of docs/ and the README from the "
                        "recorded results (--check: only compare)")
    commands.add_parser("study", add_help=False,
                        help="the small-batch study: norms, batch sizes, evaluation "
                        "statistics, cost (needs fastbn[study])")
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        info()
        return 0
    if args.command == "docs":
        from fastbn.benchmarks.docs import main as docs_main

        return docs_main(rest)
    try:
        import torch  # noqa: F401  (the benchmarks compare with it, the study trains with it)
    except ImportError:
        print(f"fastbn {args.command} needs PyTorch, which is not installed here: "
              "pip install torch==2.13.0 (the CPU build), then run it again.", file=sys.stderr)
        return 2
    if args.command == "study":
        from fastbn.study.cli import main as study_main

        return study_main(rest)
    from fastbn.benchmarks.report import main as bench_main

    return bench_main(rest)


if __name__ == "__main__":
    sys.exit(main())
