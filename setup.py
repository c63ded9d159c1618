"""Build the Cython kernels, with OpenMP when the compiler has it.

Environment variables read at build time (see docs/environment.md):

FASTBN_NO_OPENMP=1     build without OpenMP (the kernels then run on one thread)
FASTBN_MARCH_NATIVE=1  add -march=native (faster on the build machine, not portable)
FASTBN_CYTHON_DEBUG=1  turn Cython's bounds and wraparound checks back on
"""
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import textwrap

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

OPENMP_TEST_PROGRAM = textwrap.dedent(
    """
    #include <omp.h>
    #include <stdio.h>
    int main(void) {
        int n = 0;
        #pragma omp parallel reduction(+:n)
        n += 1;
        printf("%d", n > 0);
        return omp_get_max_threads() > 0 ? 0 : 1;
    }
    """
)


def env_flag(name):
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def compiler_has_openmp(compiler):
    """Compile, link and run a small OpenMP program with the compiler setuptools will use."""
    tmpdir = tempfile.mkdtemp(prefix="fastbn-openmp-probe-")
    try:
        source = os.path.join(tmpdir, "probe.c")
        with open(source, "w") as handle:
            handle.write(OPENMP_TEST_PROGRAM)
        objects = compiler.compile([source], output_dir=tmpdir, extra_postargs=["-fopenmp"])
        executable = os.path.join(tmpdir, "probe")
        compiler.link_executable(objects, executable, extra_postargs=["-fopenmp"])
        result = subprocess.run([executable], capture_output=True, text=True, timeout=60)
        return result.returncode == 0 and result.stdout.strip() == "1"
    except Exception:
        return False
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def compiler_accepts(compiler, flag):
    """Whether the compiler compiles an empty C file with `flag`."""
    tmpdir = tempfile.mkdtemp(prefix="fastbn-flag-probe-")
    try:
        source = os.path.join(tmpdir, "probe.c")
        with open(source, "w") as handle:
            handle.write("int main(void) { return 0; }\n")
        compiler.compile([source], output_dir=tmpdir, extra_postargs=[flag])
        return True
    except Exception:
        return False
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


class BuildExtWithOpenMP(build_ext):
    """Probe OpenMP once, say what was chosen, and record it for `python -m fastbn info`."""

    def build_extensions(self):
        if env_flag("FASTBN_NO_OPENMP"):
            use_openmp, reason = False, "FASTBN_NO_OPENMP is set"
        elif sys.platform == "win32":
            use_openmp, reason = False, "the probe only knows gcc/clang style flags"
        elif compiler_has_openmp(self.compiler):
            use_openmp, reason = True, "the compiler builds and runs an OpenMP program"
        else:
            use_openmp, reason = False, "the compiler could not build an OpenMP program"

        # -O3 turns on the loop vectoriser; -fno-math-errno lets sqrt be one instruction
        # (nothing reads errno). Portable code unless opted in: _batch_norm_loops.h
        # dispatches to AVX2 copies of the hot loops at run time.
        compile_args = ["-O3", "-fno-math-errno", "-Wno-psabi"]
        if env_flag("FASTBN_MARCH_NATIVE"):
            compile_args.append("-march=native")
        link_args = []
        if use_openmp:
            compile_args.append("-fopenmp")
            link_args.append("-fopenmp")
        elif sys.platform != "win32" and compiler_accepts(self.compiler, "-fopenmp-simd"):
            # The `omp simd` loops still vectorise; this needs no OpenMP runtime.
            compile_args.append("-fopenmp-simd")
        for ext in self.extensions:
            ext.extra_compile_args = list(ext.extra_compile_args) + compile_args
            ext.extra_link_args = list(ext.extra_link_args) + link_args

        print(
            f"fastbn: building with OpenMP {'ON' if use_openmp else 'OFF'} ({reason}); "
            f"extra compile args: {' '.join(compile_args)}",
            flush=True,
        )
        self.write_build_info(use_openmp, reason, compile_args)
        super().build_extensions()

    def write_build_info(self, use_openmp, reason, compile_args):
        base_flags = sysconfig.get_config_var("CFLAGS") or ""
        content = (
            "# Written by setup.py at build time; not tracked by git.\n"
            f"OPENMP = {use_openmp!r}\n"
            f"OPENMP_REASON = {reason!r}\n"
            f"COMPILER = {' '.join(getattr(self.compiler, 'compiler_so', []) or [])!r}\n"
            f"EXTRA_COMPILE_ARGS = {' '.join(compile_args)!r}\n"
            f"PYTHON_CFLAGS = {base_flags!r}\n"
        )
        targets = [os.path.join("fastbn", "_cython", "_build_info.py")]
        if not self.inplace:
            targets.append(os.path.join(self.build_lib, "fastbn", "_cython", "_build_info.py"))
        for target in targets:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "w") as handle:
                handle.write(content)


def extensions():
    directives = {
        "language_level": 3,
        "boundscheck": env_flag("FASTBN_CYTHON_DEBUG"),
        "wraparound": env_flag("FASTBN_CYTHON_DEBUG"),
        "initializedcheck": env_flag("FASTBN_CYTHON_DEBUG"),
        "cdivision": True,
    }
    modules = ["_openmp_helpers", "_memory", "_batch_norm", "_group_norm", "_layer_norm",
               "_norm_act"]
    exts = [
        Extension(
            f"fastbn._cython.{name}",
            [os.path.join("fastbn", "_cython", f"{name}.pyx")],
            include_dirs=[numpy.get_include()],
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
            # Every C header: a module includes its own loops, the SIMD layer and, for
            # GroupNorm, BatchNorm's loops; an edit to any must recompile what uses it.
            depends=glob.glob(os.path.join("fastbn", "_cython", "*.h")),
        )
        for name in modules
    ]
    return cythonize(exts, compiler_directives=directives)


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExtWithOpenMP})
