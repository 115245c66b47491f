"""Builds the one compiled extension, ``steinops._C``.

The C++ CPU kernels are always built. The CUDA kernels in ``csrc/cuda`` are built only when the
installed torch has CUDA (``torch.version.cuda``) and ``nvcc`` is found. Overrides:

    STEINOPS_CUDA=1   force the CUDA part (fails loudly if it cannot be built)
    STEINOPS_CUDA=0   skip the CUDA part
    STEINOPS_NATIVE=1 add -march=native to the C++ flags (faster, not portable)

Install with ``pip install --no-build-isolation -e .`` so the build uses the torch you have.
"""
import glob
import os
import shutil

from setuptools import setup

import torch
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension


def _want_cuda() -> bool:
    flag = os.environ.get("STEINOPS_CUDA", "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False
    has_toolchain = torch.version.cuda is not None and (
        shutil.which("nvcc") is not None or os.environ.get("CUDA_HOME")
    )
    if flag in ("1", "true", "yes", "on"):
        if not has_toolchain:
            raise RuntimeError(
                "STEINOPS_CUDA=1 but this torch has no CUDA (torch.version.cuda is None) or nvcc is missing"
            )
        return True
    return bool(has_toolchain)


def _extension():
    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # -fno-trapping-math: GCC will not if-convert a float select (x > lo ? x : lo) when the comparison may
    # raise an FP exception, so without it the `omp simd` exp loops of the AVX2 and baseline clones stay scalar
    # (measured on an AVX2-only EPYC: the window op 7x slower). No values change; FP traps are never enabled.
    cxx = ["-O3", "-fopenmp", "-ffp-contract=fast", "-fno-trapping-math"]  # C++ standard: torch's default (C++20)
    if os.environ.get("STEINOPS_NATIVE") == "1":
        cxx.append("-march=native")
    common = dict(
        name="steinops._C",
        include_dirs=[os.path.join(here, "csrc")],
        extra_link_args=["-fopenmp"],
    )
    if _want_cuda():
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        return CUDAExtension(
            sources=sources,
            define_macros=[("STEINOPS_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
            **common,
        )
    return CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **common)


setup(ext_modules=[_extension()], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
