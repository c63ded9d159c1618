"""The benchmark building blocks: the copy kernel behind the floor, interleaved timing,
the byte model and the check that guards every benchmark against a wrong result."""
import numpy as np
import pytest

from fastbn.benchmarks import batch_norm, shapes
from fastbn.benchmarks.timing import alternate

_memory = pytest.importorskip("fastbn._cython._memory")


@pytest.mark.parametrize("n_threads", [1, 2, 3, 64])
@pytest.mark.parametrize("size", [0, 1, 63, 65, 100_003])
def test_parallel_copy_copies_every_byte(rng, size, n_threads):
    src = rng.standard_normal(size).astype(np.float32)
    dst = np.full_like(src, np.nan)
    _memory.parallel_copy(src, dst, n_threads)
    np.testing.assert_array_equal(dst, src)


def test_parallel_copy_copies_between_dtypes_by_bytes(rng):
    src = rng.standard_normal((4, 5))
    dst = np.zeros(src.nbytes, np.uint8)
    _memory.parallel_copy(src, dst, 2)
    np.testing.assert_array_equal(dst.view(np.float64).reshape(4, 5), src)


@pytest.mark.parametrize("src, dst, message", [
    (np.zeros(8), np.zeros(7), "bytes"),
    (np.zeros((4, 4))[:, ::2], np.zeros(8), "C-contiguous"),
])
def test_parallel_copy_rejects_mismatched_buffers(src, dst, message):
    with pytest.raises(ValueError, match=message):
        _memory.parallel_copy(src, dst, 2)


def test_parallel_copy_rejects_zero_threads():
    with pytest.raises(ValueError, match="n_threads"):
        _memory.parallel_copy(np.zeros(4), np.zeros(4), 0)


def test_alternate_warms_up_then_times_every_implementation():
    calls = {"a": 0, "b": 0}

    def counter(name):
        def call():
            calls[name] += 1
        return call

    timings = alternate({"a": counter("a"), "b": counter("b")}, repeats=5, warmup=2,
                        min_round_s=0.0)
    assert list(timings) == ["a", "b"]
    for name, timing in timings.items():
        assert timing.rounds == 5 and timing.calls_per_round == 1
        assert calls[name] == 2 + 5
        assert 0 < timing.min_s <= timing.q1_s <= timing.median_s <= timing.q3_s <= timing.max_s


@pytest.mark.parametrize("channels_last", [False, True])
def test_case_inputs_have_the_requested_layout(channels_last):
    case = batch_norm.BatchNormCase((2, 3, 4, 5), "float64", channels_last)
    for array in (case.x, case.grad_out):
        assert array.shape == (2, 3, 4, 5)
        assert np.moveaxis(array, 1, -1).flags.c_contiguous == channels_last
        assert array.flags.c_contiguous != channels_last


def test_bytes_moved_convention():
    assert batch_norm.bytes_moved(100, "training") == 500
    assert batch_norm.bytes_moved(100, "eval") == 200


def test_grids_hold_the_resnet_shapes():
    assert (8, 64, 56, 56) in shapes.BATCH_NORM_2D.shapes()
    assert (1, 16, 8, 8) in shapes.BATCH_NORM_2D.shapes()
    assert len(shapes.BATCH_NORM_2D.shapes()) == 4 * 4 + 1


@pytest.mark.parametrize("mode", batch_norm.MODES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_case_check_accepts_a_match_and_rejects_a_wrong_result(mode, channels_last):
    case = batch_norm.BatchNormCase((2, 3, 4, 5), "float32", channels_last)
    outputs = case.fastbn_step("numpy", mode)()
    case.check(outputs, outputs, mode)
    wrong = [np.array(a, copy=True) for a in outputs]
    wrong[0].flat[7] += 1e-2
    with pytest.raises(AssertionError, match="differs from torch"):
        case.check(wrong, outputs, mode)
