"""The instruction sets of the Cython kernels (fastbn/_cython/_simd.h) and FASTBN_SIMD.

Every kernel loop is compiled for the build's baseline (SSE2 on x86-64), AVX2 + FMA and
AVX-512; each kernel module runs the widest one the CPU supports, or a narrower one named
by the FASTBN_SIMD environment variable (read once, when a kernel module is imported), so
that the AVX2 path can be measured on an AVX-512 machine. `python -m fastbn info` prints
the choice per op.
"""
import os

# In the order of _simd.h's FASTBN_ISA_* codes (the index is the code).
INSTRUCTION_SETS = ("baseline", "avx2", "avx512")
ALIASES = {"sse2": "baseline", "avx512f": "avx512"}


def limit_from_environment():
    """The widest instruction set FASTBN_SIMD allows, as a code (all when unset)."""
    value = os.environ.get("FASTBN_SIMD", "").strip().lower()
    if not value:
        return len(INSTRUCTION_SETS) - 1
    name = ALIASES.get(value, value)
    if name not in INSTRUCTION_SETS:
        raise ValueError(f"FASTBN_SIMD must be one of baseline (or sse2), avx2, avx512, "
                         f"got {os.environ['FASTBN_SIMD']!r}")
    return INSTRUCTION_SETS.index(name)


# The Cython kernel module of each op, for `instruction_sets`.
KERNEL_MODULES = {"batch_norm": "_batch_norm", "group_norm": "_group_norm",
                  "instance_norm": "_group_norm", "layer_norm": "_layer_norm",
                  "rms_norm": "_layer_norm", "filter_response_norm": "_norm_act",
                  "evonorm_s0": "_norm_act"}


def instruction_sets():
    """{op: the instruction set its Cython kernels run here} (`python -m fastbn info`)."""
    import importlib

    sets = {}
    for op, module in KERNEL_MODULES.items():
        try:
            kernels = importlib.import_module(f"fastbn._cython.{module}")
        except ImportError:
            sets[op] = "not built"
            continue
        sets[op] = kernels.INSTRUCTION_SET
    return sets
