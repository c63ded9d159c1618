"""The benchmarks' busy-machine rule (fastbn/benchmarks/machine.py): other processes' CPU
use from two samples of /proc, this process's own time left out."""
import os
import subprocess
import sys
import time

import pytest

from fastbn.benchmarks import machine
from fastbn.benchmarks.machine import CpuSample, is_busy, other_processes_cpus

needs_proc = pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs Linux /proc")


def test_other_processes_cpus_is_the_busy_time_less_this_process():
    before = CpuSample(busy=1000, total=4000, own=300)
    # 200 ticks on 2 CPUs (1 s at 100 Hz): 150 busy, 50 of them this process's.
    after = CpuSample(busy=1150, total=4200, own=350)
    assert other_processes_cpus(before, after, cpus=2) == pytest.approx(1.0)
    # All the busy time was this process's own: nobody else ran.
    assert other_processes_cpus(before, CpuSample(1150, 4200, 450), cpus=2) == 0.0
    # Tick counts read a moment apart can disagree by a tick: clamped, never negative.
    assert other_processes_cpus(before, CpuSample(1100, 4200, 460), cpus=2) == 0.0
    assert other_processes_cpus(before, CpuSample(1400, 4200, 300), cpus=2) == 2.0
    assert other_processes_cpus(before, before, cpus=2) == 0.0  # no time passed


def test_is_busy_when_other_processes_take_the_cores_the_threads_need():
    # 2 cores, 2 threads: a quiet machine (daemons, a few percent) is not busy, the
    # state after a previous run that kept the load average at 0.6 neither (nothing
    # runs now), and one other process spinning is.
    assert not is_busy(0.05, threads=2, usable_cpus=2)
    assert is_busy(1.0, threads=2, usable_cpus=2)
    # 1 thread leaves a core free for someone else.
    assert not is_busy(1.0, threads=1, usable_cpus=2)
    assert is_busy(1.6, threads=1, usable_cpus=2)


@needs_proc
def test_own_cpu_time_is_sampled():
    """This process's own ticks grow while it computes: what the rule subtracts, so that
    the benchmark's own work never makes the machine look busy."""
    before = machine.sample_cpu_time()
    start = time.process_time()
    while time.process_time() - start < 0.3:  # CPU time: a loaded machine stretches it
        pass
    after = machine.sample_cpu_time()
    ticks = os.sysconf("SC_CLK_TCK")
    assert after.own - before.own >= 0.2 * ticks
    # /proc/stat's per-CPU counters are tick samples; a process's utime + stime are its
    # exact run time cut into ticks. The two can disagree by a few ticks either way (CI
    # once saw the process's own time run ahead of its CPUs' busy time): allow 0.05 s.
    assert after.total > before.total
    assert after.busy - before.busy >= after.own - before.own - 0.05 * ticks


@needs_proc
def test_a_busy_child_process_is_seen():
    """A process spinning on a core shows as about one CPU of other processes' use.
    (Other people's processes can only add to it.)"""
    spinner = subprocess.Popen([sys.executable, "-c",
                                "import time\nend = time.time() + 5\n"
                                "while time.time() < end: pass"])
    try:
        time.sleep(0.2)  # started
        other_cpus = machine.measure_other_processes(window_s=0.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert other_cpus >= 0.7
    assert is_busy(other_cpus, threads=len(os.sched_getaffinity(0)),
                   usable_cpus=len(os.sched_getaffinity(0)))
