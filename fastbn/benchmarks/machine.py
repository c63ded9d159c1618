"""The machine a benchmark runs on: what it is, and whether others keep it busy.

What it is (`describe`, `summary`): every figure fastbn publishes is stored with it
(results.json's "machine"), and every page that quotes a figure names it. The same
kernels measured 3.4x over torch on an AVX-512 EPYC with a 32 MB L3 and 1.9x on an AVX2
one with 8 MB: a figure without its CPU, vector extensions and caches says little.

Whether other processes keep the CPUs busy, measured before a benchmark runs
(`measure_other_processes`, `is_busy`). The load average is the wrong gauge here: it
decays over a minute, so on a quiet machine it still counts the benchmark's own start-up
(imports, numba's compiles) and the previous run (0.55-0.69 on an idle 2-core machine).
Instead, two samples of the CPU time spent on the CPUs this process may use (/proc/stat)
and of this process's own (/proc/self/stat), a short window apart, give how many CPUs
*other* processes used in that window (`other_processes_cpus`); `is_busy` decides from
that number. Linux only (/proc); elsewhere `measure_other_processes` returns None.
"""
import os
import platform
import sys
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


# The vector extensions that decide which of fastbn's code paths runs (fastbn/_cython/_simd.h)
# and how fast torch's do, in the order they are listed.
VECTOR_EXTENSIONS = ("sse2", "avx", "avx2", "fma", "avx512f", "avx512dq", "avx512bw",
                     "avx512vl", "avx512_vnni", "avx512_bf16", "amx_tile")


def _cpuinfo_field(name):
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model():
    """The CPU's model name (Linux), with its family and model numbers (a virtual machine
    may report only "Intel(R) Xeon(R) Processor"), else what `platform` knows."""
    name = _cpuinfo_field("model name")
    if name is None:
        return platform.processor() or platform.machine()
    family, model = _cpuinfo_field("cpu family"), _cpuinfo_field("model")
    return f"{name} (family {family}, model {model})" if family and model else name


def vector_extensions():
    """The extensions of `VECTOR_EXTENSIONS` this CPU reports (Linux; [] elsewhere)."""
    flags = set((_cpuinfo_field("flags") or "").split())
    return [name for name in VECTOR_EXTENSIONS if name in flags]


def caches():
    """{"L1d": "48K", "L2": "2048K", "L3": ...}: the first CPU's caches as Linux reports
    them (a guest may report its host's shared L3)."""
    sizes = {}
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        entries = sorted(os.listdir(base))
    except OSError:
        return sizes
    for entry in entries:
        if not entry.startswith("index"):
            continue
        try:
            with open(os.path.join(base, entry, "level")) as level_file, \
                    open(os.path.join(base, entry, "type")) as type_file, \
                    open(os.path.join(base, entry, "size")) as size_file:
                level, kind, size = (f.read().strip() for f in (level_file, type_file,
                                                                 size_file))
        except OSError:
            continue
        if kind == "Instruction":
            continue
        sizes[f"L{level}" + ("d" if kind == "Data" else "")] = size
    return sizes


def describe(threads):
    """The record: CPU, extensions, caches, CPUs, fastbn's instruction sets, versions."""
    import numpy

    import fastbn
    from fastbn import _simd
    from fastbn._threads import _cpus_available

    record = {
        "cpu": cpu_model(),
        "vector_extensions": vector_extensions(),
        "caches": caches(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": _cpus_available(),
        "threads": threads,
        "fastbn_instruction_sets": _simd.instruction_sets(),
        "fastbn_simd_limit": os.environ.get("FASTBN_SIMD"),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "fastbn": fastbn.__version__,
    }
    if "torch" in sys.modules:
        record["torch"] = sys.modules["torch"].__version__
    if "numba" in sys.modules:
        record["numba"] = sys.modules["numba"].__version__
    return record


def summary(record):
    """One line for a page or a table caption: 'Intel Xeon ..., AVX-512, L2 2048K, ...'."""
    extensions = record["vector_extensions"]
    widest = ("AVX-512" if "avx512f" in extensions else "AVX2 + FMA" if "avx2" in extensions
              else "SSE2")
    cache_text = ", ".join(f"{name} {size}" for name, size in record["caches"].items()
                           if name != "L1d")
    limit = record.get("fastbn_simd_limit")
    forced = f", fastbn forced to FASTBN_SIMD={limit}" if limit else ""
    return (f"{record['cpu']}, {widest}{forced}, {cache_text}, {record['usable_cpus']} "
            f"usable CPUs, {record['threads']} threads, torch {record.get('torch', '-')}")
