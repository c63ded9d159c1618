# The SIMD dispatch layer of _simd.h, for the kernel modules that include it. Each such
# module calls `select_instruction_set()` once at import; see _simd.h.
cdef extern from "_simd.h" nogil:
    int fastbn_simd_select(int limit)
    int fastbn_simd_supported()


cdef inline str select_instruction_set():
    """Pick this module's instruction set: the widest the CPU runs, capped by FASTBN_SIMD.
    Returns its name (fastbn._simd.INSTRUCTION_SETS)."""
    from fastbn._simd import INSTRUCTION_SETS, limit_from_environment
    return INSTRUCTION_SETS[fastbn_simd_select(limit_from_environment())]
