"""Per-call overhead of fastbn.nn: a BatchNorm2d training step on a tiny input, and its parts.

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=$PWD python bench/nn_overhead.py [--threads 2]

On (1, 16, 8, 8) the kernels take a few microseconds, so a step's time is the Python and
autograd machinery around them; the parts are timed alone (fastbn/benchmarks/costs.py, the
same measurement `python -m fastbn bench` records for docs/nn.md).
"""
import argparse
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from fastbn.benchmarks import costs  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--shape", type=int, nargs="+", default=list(costs.TINY_SHAPE))
    args = parser.parse_args(argv)
    parts = costs.per_call_parts(args.threads, args.repeats, tuple(args.shape))
    print(f"shape {tuple(args.shape)}, float32, {args.threads} threads (medians)\n")
    print("| case | us per call |")
    print("| --- | ---: |")
    for name, us in parts.items():
        print(f"| {name} | {us:.1f} |")


if __name__ == "__main__":
    main()
