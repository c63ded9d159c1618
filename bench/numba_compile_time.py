"""Numba backend: what the first call of each op costs, cold (empty cache) and warm (cache filled).

Usage: PYTHONPATH=. python bench/numba_compile_time.py [--ops batch_norm ...] [--runs 1]
                                                       [--dtypes float32 float64]

Ops: batch_norm, batch_norm_activation (the fused-activation kernel, compiled on the first
call with an activation), group_norm (also InstanceNorm's), layer_norm (also RMSNorm's).
Each op runs in a fresh interpreter with NUMBA_CACHE_DIR set to a new empty directory:
the first forward + backward calls (training and eval; contiguous and channels-last, with
and without weights) compile, one dtype after the other; a second interpreter on the
same directory then loads the cache. Compiling is single-threaded, so the cost is given
as process CPU time (steadier than wall time on a shared machine); wall time beside it.
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import textwrap

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

# One child per (op, cache state). It times `import numba` + `import fastbn._numba.<module>`
# (nothing is compiled on import) and then the first calls, per dtype.
CHILD = """
import json, sys, time
start_cpu, start_wall = time.process_time(), time.perf_counter()
import numpy as np
import fastbn
op, dtypes = sys.argv[1], sys.argv[2].split(",")
fastbn.set_num_threads(2)
rng = np.random.default_rng(0)


def channels_last(a):
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1)


def calls(dtype):
    x = rng.standard_normal((2, 8, 40, 40)).astype(dtype)
    w, b = np.ones(8, dtype), np.zeros(8, dtype)
    for data in (x, channels_last(x)):
        for weight, bias in ((w, b), (None, None)):
            if op.startswith("batch_norm"):
                act = "relu" if op == "batch_norm_activation" else None
                rm, rv = np.zeros(8, dtype), np.ones(8, dtype)
                for training in (True, False):
                    y, m, i = fastbn.batch_norm_forward(data, weight, bias, rm, rv, training,
                                                        activation=act, backend="numba")
                    fastbn.batch_norm_backward(data, data, weight, m, i, training,
                                               activation=act, bias=bias, backend="numba")
            elif op == "group_norm":
                y, m, r = fastbn.group_norm_forward(data, 4, weight, bias, backend="numba")
                fastbn.group_norm_backward(data, data, m, r, weight, 4, backend="numba")
                y, m, r = fastbn.instance_norm_forward(data, weight, bias, backend="numba")
                fastbn.instance_norm_backward(data, data, m, r, weight, True, backend="numba")
            else:
                rows = x.reshape(-1, 40)
                weight, bias = (None, None) if weight is None else (np.ones(40, dtype),
                                                                    np.zeros(40, dtype))
                y, m, r = fastbn.layer_norm_forward(rows, 40, weight, bias, backend="numba")
                fastbn.layer_norm_backward(rows, rows, 40, m, r, weight, bias, backend="numba")
                y, r = fastbn.rms_norm_forward(rows, 40, weight, backend="numba")
                fastbn.rms_norm_backward(rows, rows, 40, r, weight, backend="numba")


result = {"import_cpu_s": time.process_time() - start_cpu,
          "import_wall_s": time.perf_counter() - start_wall}
for dtype in dtypes:
    cpu, wall = time.process_time(), time.perf_counter()
    calls(np.dtype(dtype))
    result[dtype] = {"cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall}
result["total_cpu_s"] = time.process_time() - start_cpu
result["total_wall_s"] = time.perf_counter() - start_wall
print(json.dumps(result))
"""


def run_child(op, dtypes, cache_dir):
    path = [str(REPO_ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir, PYTHONPATH=os.pathsep.join(path))
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(CHILD), op, ",".join(dtypes)],
                         capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"{op} child failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", nargs="+", default=["batch_norm", "batch_norm_activation",
                                                     "group_norm", "layer_norm"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    for op in args.ops:
        for run in range(args.runs):
            with tempfile.TemporaryDirectory() as cache_dir:
                cold = run_child(op, args.dtypes, cache_dir)
                warm = run_child(op, args.dtypes, cache_dir)
            for state, r in (("cold", cold), ("warm", warm)):
                per_dtype = "  ".join(f"{d} {r[d]['cpu_s']:6.2f} s cpu ({r[d]['wall_s']:6.2f} wall)"
                                      for d in args.dtypes)
                print(f"{op:21s} {state}: imports {r['import_cpu_s']:.2f} s cpu, first calls: "
                      f"{per_dtype}; process {r['total_cpu_s']:.2f} s cpu", flush=True)


if __name__ == "__main__":
    main()
