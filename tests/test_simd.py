"""The SIMD dispatch layer (fastbn/_cython/_simd.h, fastbn/_simd.py): FASTBN_SIMD, the
instruction set each op runs, and the same numbers on every instruction set the CPU has."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import fastbn
from fastbn import _simd

pytestmark = pytest.mark.skipif("cython" not in fastbn.available_backends(),
                                reason="the Cython kernels are not built")


@pytest.mark.parametrize("value, code", [(None, 2), ("", 2), ("avx512", 2), ("AVX2", 1),
                                         ("avx2", 1), ("baseline", 0), ("sse2", 0),
                                         (" avx512f ", 2)])
def test_limit_from_environment(value, code, monkeypatch):
    if value is None:
        monkeypatch.delenv("FASTBN_SIMD", raising=False)
    else:
        monkeypatch.setenv("FASTBN_SIMD", value)
    assert _simd.limit_from_environment() == code


def test_bad_value_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("FASTBN_SIMD", "avx3")
    with pytest.raises(ValueError, match="FASTBN_SIMD must be one of baseline .* got 'avx3'"):
        _simd.limit_from_environment()


def run_with_simd(value, code):
    """Run `code` in a new process with FASTBN_SIMD=value; its stdout."""
    env = dict(os.environ, FASTBN_SIMD=value)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


PROBE = """
import json, numpy as np, fastbn
from fastbn import _simd
rng = np.random.default_rng(0)
f32 = np.float32
out = {"isa": _simd.instruction_sets()}


def cl(a):
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1)


def record(name, arrays):
    out[name] = [np.asarray(a).ravel().tolist() for a in arrays if a is not None]


# Each op on every work split of its kernels (see each kernel module's docstring).
for layout, shape in [("cf", (3, 20, 7, 7)), ("cl", (2, 40, 5, 5))]:
    x = (rng.standard_normal(shape) * 3 + 2).astype(f32)
    g = rng.standard_normal(shape).astype(f32)
    x, g = (cl(x), cl(g)) if layout == "cl" else (x, g)
    w, b = np.linspace(0.5, 1.5, shape[1], dtype=f32), np.zeros(shape[1], f32)
    y, m, i = fastbn.batch_norm_forward(x, w, b, training=True, activation="relu6")
    record("batch_norm " + layout, (y, m, i) + fastbn.batch_norm_backward(
        g, x, w, m, i, True, activation="relu6", bias=b))
for layout, shape, groups in [("cf", (4, 32, 6, 6), 8), ("cf", (1, 8, 70, 70), 2),
                              ("cl", (2, 40, 5, 5), 4), ("cl", (1, 16, 48, 48), 4)]:
    x = (rng.standard_normal(shape) * 3 + 2).astype(f32)
    g = rng.standard_normal(shape).astype(f32)
    x, g = (cl(x), cl(g)) if layout == "cl" else (x, g)
    w, b = rng.uniform(0.5, 1.5, shape[1]).astype(f32), rng.standard_normal(shape[1]).astype(f32)
    y, m, r = fastbn.group_norm_forward(x, groups, w, b)
    record(f"group_norm {layout} {shape}", (y, m, r) + fastbn.group_norm_backward(
        g, x, m, r, w, groups))
    y, m, r = fastbn.instance_norm_forward(x, w, b)
    record(f"instance_norm {layout} {shape}", (y, m, r) + fastbn.instance_norm_backward(
        g, x, m, r, w))
for shape in [(96, 72), (2, 9000)]:
    x = (rng.standard_normal(shape) * 3 + 2).astype(f32)
    g = rng.standard_normal(shape).astype(f32)
    D = shape[-1]
    w, b = rng.uniform(0.5, 1.5, D).astype(f32), rng.standard_normal(D).astype(f32)
    y, m, r = fastbn.layer_norm_forward(x, D, w, b)
    record(f"layer_norm {shape}", (y, m, r) + fastbn.layer_norm_backward(g, x, D, m, r, w, b))
    y, r = fastbn.rms_norm_forward(x, D, w)
    record(f"rms_norm {shape}", (y, r) + fastbn.rms_norm_backward(g, x, D, r, w))
for layout, shape in [("cf", (2, 32, 9, 9)), ("cl", (2, 48, 5, 5))]:
    x = (rng.standard_normal(shape) * 3 + 2).astype(f32)
    g = rng.standard_normal(shape).astype(f32)
    x, g = (cl(x), cl(g)) if layout == "cl" else (x, g)
    C = shape[1]
    w, b = rng.uniform(0.5, 1.5, C).astype(f32), rng.standard_normal(C).astype(f32)
    tau, v = rng.standard_normal(C).astype(f32), rng.uniform(0.5, 1.5, C).astype(f32)
    y, r = fastbn.filter_response_norm_forward(x, w, b, tau)
    record(f"filter_response_norm {layout}", (y, r) + fastbn.filter_response_norm_backward(
        g, x, r, w, b, tau))
    y, m, r = fastbn.evonorm_s0_forward(x, 8, w, b, v)
    record(f"evonorm_s0 {layout}", (y, m, r) + fastbn.evonorm_s0_backward(g, x, m, r, 8, w, v))
print(json.dumps(out))
"""


def test_every_instruction_set_gives_the_same_numbers():
    """Every op on each instruction set this CPU runs (FASTBN_SIMD capping the choice) gives
    the same numbers to a few float32 ulps: the sums add in the same order on every path,
    and only where AVX2 and AVX-512 contract a multiply and an add into one FMA do the
    results differ, in the last bits (each path's numbers against the float64 reference are
    the other tests' business, run under FASTBN_SIMD in CI and by hand)."""
    widest = _simd.instruction_sets()["batch_norm"]
    supported = _simd.INSTRUCTION_SETS[:_simd.INSTRUCTION_SETS.index(widest) + 1]
    results = {isa: json.loads(run_with_simd(isa, PROBE)) for isa in supported}
    for isa, result in results.items():
        assert result.pop("isa") == dict.fromkeys(_simd.KERNEL_MODULES, isa)
    first = results[supported[0]]
    assert len(first) == 18
    for isa in supported[1:]:
        assert results[isa].keys() == first.keys()
        for name in first:
            for index, (a, b) in enumerate(zip(first[name], results[isa][name])):
                a, b = np.array(a), np.array(b)
                # Within 4 float32 ulps of the result's largest value (the parameter
                # gradients are sums of many terms).
                np.testing.assert_allclose(a, b, rtol=0, atol=4 * np.spacing(
                    np.float32(np.abs(b).max())), err_msg=f"{isa} {name} result {index}")


def test_info_names_each_ops_instruction_set():
    result = subprocess.run([sys.executable, "-m", "fastbn", "info"], capture_output=True,
                            text=True, timeout=120,
                            env=dict(os.environ, FASTBN_SIMD="baseline"))
    assert result.returncode == 0, result.stderr
    assert "instruction sets (FASTBN_SIMD='baseline'):" in result.stdout
    for op in ("batch_norm", "group_norm", "instance_norm", "layer_norm", "rms_norm"):
        assert f"  {op}: baseline" in result.stdout
