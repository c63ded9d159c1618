"""Whether other processes keep the CPUs busy: measured before a benchmark runs.

The load average is the wrong gauge here: it decays over a minute, so on a quiet
machine it still counts the benchmark's own start-up (imports, numba's compiles) and
the previous run (0.55-0.69 on an idle 2-core machine). Instead, two samples of the
CPU time spent on the CPUs this process may use (/proc/stat) and of this process's own
(/proc/self/stat), a short window apart, give how many CPUs *other* processes used in
that window (`other_processes_cpus`); `is_busy` decides from that number.

Linux only (/proc); elsewhere `measure_other_processes` returns None.
"""
import os
import time
from dataclasses import dataclass

WINDOW_S = 0.5
# Other processes' CPUs that a run tolerates beyond the ones its threads leave free:
# background daemons use a few percent; a busy process uses a whole CPU.
SLACK_CPUS = 0.5


@dataclass(frozen=True)
class CpuSample:
    """CPU time, in clock ticks, up to one moment.

    Attributes
    ----------
    busy : int
        Ticks the CPUs of this process's affinity mask spent on any work (all but idle
        and iowait).
    total : int
        Ticks those CPUs spent in all states.
    own : int
        Ticks this process (every thread) spent in user and system mode.
    """

    busy: int
    total: int
    own: int


def sample_cpu_time(cpus=None):
    """A `CpuSample` now, over `cpus` (CPU numbers; default this process's affinity
    mask), or None without /proc."""
    if cpus is None:
        cpus = os.sched_getaffinity(0)
    names = {f"cpu{n}" for n in cpus}
    busy = total = 0
    try:
        with open("/proc/stat") as stat:
            for line in stat:
                fields = line.split()
                if fields and fields[0] in names:
                    # user nice system idle iowait irq softirq steal (guest time is
                    # already in user and nice).
                    ticks = [int(value) for value in fields[1:9]]
                    total += sum(ticks)
                    busy += sum(ticks) - ticks[3] - ticks[4]
        with open("/proc/self/stat") as stat:
            # The command name (field 2) may hold spaces: count from after its ')'.
            fields = stat.read().rsplit(")", 1)[1].split()
        own = int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15
    except (OSError, ValueError, IndexError):
        return None
    return CpuSample(busy, total, own)


def other_processes_cpus(before, after, cpus):
    """How many of the `cpus` CPUs other processes kept busy between two samples, on
    average (0 to `cpus`): the busy time of those CPUs less this process's own."""
    total = after.total - before.total
    if total <= 0:
        return 0.0
    others = (after.busy - before.busy) - (after.own - before.own)
    return min(float(cpus), max(0.0, others / total * cpus))


def is_busy(other_cpus, threads, usable_cpus):
    """Whether `threads` threads of a benchmark would wait for cores that other processes
    use: OpenMP threads that wait for a core stall every barrier, and the times then
    measure the other processes, not the kernels."""
    return other_cpus + threads > usable_cpus + SLACK_CPUS


def measure_other_processes(window_s=WINDOW_S):
    """The CPUs other processes used over the next `window_s` seconds (sleeping), or None
    where /proc is not there."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    if cpus is None:
        return None
    before = sample_cpu_time(cpus)
    time.sleep(window_s)
    after = sample_cpu_time(cpus)
    if before is None or after is None:
        return None
    return other_processes_cpus(before, after, len(cpus))
