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
from fastbn._cython import _batch_norm
rng = np.random.default_rng(0)
out = {"isa": _batch_norm.INSTRUCTION_SET}
for name, shape, layout in [("cf", (3, 20, 7, 7), None), ("cl", (2, 40, 5, 5), "cl")]:
    x = (rng.standard_normal(shape) * 3 + 2).astype(np.float32)
    if layout:
        x = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
    g = rng.standard_normal(shape).astype(np.float32)
    w, b = np.linspace(0.5, 1.5, shape[1], dtype=np.float32), np.zeros(shape[1], np.float32)
    y, m, i = fastbn.batch_norm_forward(x, w, b, training=True, activation="relu6")
    grads = fastbn.batch_norm_backward(g, x, w, m, i, True, activation="relu6", bias=b)
    out[name] = [a.ravel().tolist() for a in (y, m, i) + grads]
print(json.dumps(out))
"""


def test_every_instruction_set_gives_the_same_numbers():
    """Each instruction set this CPU runs (FASTBN_SIMD capping the choice) gives the
    float64 reference's numbers to float32's tolerance, and each other's to a few ulps."""
    supported = _simd.INSTRUCTION_SETS[:_simd.INSTRUCTION_SETS.index(
        _simd.instruction_sets()["batch_norm"]) + 1]
    results = {isa: json.loads(run_with_simd(isa, PROBE)) for isa in supported}
    for isa, result in results.items():
        assert result["isa"] == isa
    first = results[supported[0]]
    for isa in supported[1:]:
        for name in ("cf", "cl"):
            for a, b in zip(first[name], results[isa][name]):
                np.testing.assert_allclose(a, b, rtol=2e-6, atol=2e-6, err_msg=f"{isa} {name}")


def test_info_names_each_ops_instruction_set():
    result = subprocess.run([sys.executable, "-m", "fastbn", "info"], capture_output=True,
                            text=True, timeout=120,
                            env=dict(os.environ, FASTBN_SIMD="baseline"))
    assert result.returncode == 0, result.stderr
    assert "instruction sets (FASTBN_SIMD='baseline'):" in result.stdout
    assert "batch_norm: baseline" in result.stdout
