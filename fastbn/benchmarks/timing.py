"""Timing helpers: several implementations timed interleaved, and the bandwidth floor.

Why interleaved: on a shared or thermally throttled machine the speed drifts
over seconds. Timing A for a while and then B puts that drift into the A/B
ratio; rounds of A B C, A B C, ... expose every implementation to the same
drift, and the median over rounds drops the rounds a neighbour disturbed.

Why in a new random order each round: an implementation pays for what the one
before it left behind (freed memory the allocator gave back to the system, which
the next call's first touches must fault in again; another pool's threads still
spinning). Measured: the same fastbn.nn step took 280 us right after torch's and
211 us elsewhere in the same run. Rotating a fixed order (A B C, B C A, ...) keeps
every implementation behind the same predecessor; shuffling does not.
"""
import gc
import math
import random
import statistics
import time
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Timing:
    """Per-call times of one implementation over the timed rounds, in seconds."""

    median_s: float
    q1_s: float
    q3_s: float
    min_s: float
    max_s: float
    rounds: int
    calls_per_round: int

    @property
    def relative_iqr(self):
        """Interquartile range / median: how noisy the measurement was."""
        return (self.q3_s - self.q1_s) / self.median_s if self.median_s > 0 else 0.0


def _summarise(per_call_s, calls_per_round):
    if len(per_call_s) >= 2:
        q1, median, q3 = statistics.quantiles(per_call_s, n=4, method="inclusive")
    else:
        q1 = median = q3 = per_call_s[0]
    return Timing(median, q1, q3, min(per_call_s), max(per_call_s), len(per_call_s),
                  calls_per_round)


def _time_calls(fn, calls, clock=time.perf_counter):
    start = clock()
    for _ in range(calls):
        fn()
    return clock() - start


def alternate(callables, repeats=30, warmup=3, min_round_s=5e-4, seed=0,
              clock=time.perf_counter):
    """Time implementations interleaved: rounds of A B C, C A B, B A C, ... (shuffled).

    Parameters
    ----------
    callables : dict of str to callable
        The implementations, each called with no arguments.
    repeats : int, >= 1
        Timed rounds. Each round calls every implementation once in turn (its
        `calls_per_round` calls back to back), in an order shuffled anew each
        round, so no implementation always runs first or after the same one.
    warmup : int, >= 1
        Untimed interleaved rounds first, so JIT compilation, first-touch page
        faults and thread-pool start-up are never timed.
    min_round_s : float
        Fast calls are repeated within a round until the round lasts at least
        this long (calibrated on the fastest warm-up call), so the clock's
        resolution and the loop overhead do not matter.
    seed : int
        Of the shuffles: the same seed gives the same orders.
    clock : callable
        The clock, in seconds. ``time.thread_time`` counts only the calling thread's
        CPU time, which time spent descheduled by other processes does not add to:
        steadier on a busy machine, and right only for work done on the calling thread
        (one thread).

    Returns
    -------
    dict of str to Timing
        Per-call times, in the order of `callables`.
    """
    if repeats < 1 or warmup < 1:
        raise ValueError(f"repeats and warmup must be >= 1, got {repeats} and {warmup}")
    names = list(callables)
    fastest_call_s = {name: math.inf for name in names}
    for _ in range(warmup):
        for name in names:
            fastest_call_s[name] = min(fastest_call_s[name],
                                     _time_calls(callables[name], 1, clock))
    calls_per_round = {name: max(1, math.ceil(min_round_s / max(fastest_call_s[name], 1e-9)))
                       for name in names}

    per_call_s = {name: [] for name in names}
    order = random.Random(seed)
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside one implementation's round is not its cost
    try:
        for _ in range(repeats):
            for name in order.sample(names, len(names)):
                calls = calls_per_round[name]
                per_call_s[name].append(_time_calls(callables[name], calls, clock) / calls)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: _summarise(per_call_s[name], calls_per_round[name]) for name in names}


def bandwidth_floor(bytes_moved, n_threads):
    """A callable that moves `bytes_moved` bytes with a copy on `n_threads` threads.

    The copy reads `bytes_moved / 2` bytes and writes as many, split into one
    contiguous chunk per thread (fastbn._cython._memory.parallel_copy). Its time
    is a floor for a kernel that must read and write that many bytes with the
    same threads: the op's bytes_moved is given by its benchmark module (e.g.
    fastbn.benchmarks.batch_norm.bytes_moved). Time it in the same `alternate`
    call as the kernels, so that it sees the same machine state.

    Parameters
    ----------
    bytes_moved : int
        Bytes read plus bytes written.
    n_threads : int

    Returns
    -------
    callable
        Copies between two buffers allocated (and touched) here.
    """
    from fastbn._cython._memory import parallel_copy

    half = max(1, int(bytes_moved) // 2)
    src = np.ones(half, np.uint8)
    dst = np.ones(half, np.uint8)

    def copy():
        parallel_copy(src, dst, n_threads)

    return copy
