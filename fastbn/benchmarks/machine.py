"""The machine a benchmark ran on, as one record: every figure fastbn publishes is stored
with it (results.json's "machine"), and every page that quotes a figure names it.

The same kernels measured 3.4x over torch on an AVX-512 EPYC with a 32 MB L3 and 1.9x on
an AVX2 one with 8 MB: a figure without its CPU, vector extensions and caches says little.
"""
import os
import platform
import sys

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
