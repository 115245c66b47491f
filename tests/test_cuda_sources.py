"""Compile every ``csrc/cuda/*.cu`` with the machine's nvcc (no GPU needed).

This catches compile errors in the CUDA backend on machines that cannot build or run it (a CPU-only
torch, no GPU): each source is compiled to an object file for one architecture, with torch's
headers and the flags ``setup.py`` / ``torch.utils.cpp_extension`` would use. Skipped when nvcc is
not found (``PATH``, ``CUDA_HOME``, ``CUDA_PATH``, ``/usr/local/cuda``).

Notes on the flags:

* ``-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE`` is added when torch's include tree lacks
  ``c10/cuda/impl/cuda_cmake_macros.h`` (CPU wheels do not ship it, but ``c10/cuda/CUDAMacros.h``
  includes it unless this macro is defined; on Linux the generated file only matters for Windows
  DLL exports).
* Device code is compiled with reduced optimisation (``-Xcicc -O1 -Xptxas -O1``) to keep the test
  quick; ptxas still checks resources (shared memory, registers, ...).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from torch.utils import cpp_extension  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
ARCH = os.environ.get("STEINOPS_TEST_CUDA_ARCH", "90")  # one architecture keeps the test quick


def _find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            cand = Path(home) / "bin" / "nvcc"
            if cand.is_file() and os.access(cand, os.X_OK):
                return str(cand)
    return None


NVCC = _find_nvcc()


def _arch_flag(nvcc: str) -> str:
    """``-arch=sm_<ARCH>`` if this nvcc knows it, else the newest real architecture it lists."""
    try:
        listed = subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True, timeout=60).stdout.split()
    except (OSError, subprocess.SubprocessError):
        listed = []
    sms = [a for a in listed if a.startswith("sm_") and a[3:].isdigit()]
    if not sms or f"sm_{ARCH}" in sms:
        return f"-arch=sm_{ARCH}"
    return f"-arch={max(sms, key=lambda a: int(a[3:]))}"


def _compile_command(nvcc: str, src: Path, obj: Path) -> list[str]:
    includes = list(cpp_extension.include_paths()) + [sysconfig.get_paths()["include"], str(ROOT / "csrc")]
    cmd = [nvcc, "-c", str(src), "-o", str(obj), "-std=c++20", "-O1", _arch_flag(nvcc)]
    cmd += ["-Xcicc", "-O1", "-Xptxas", "-O1"]
    cmd += [f"-I{p}" for p in includes]
    cmd += [
        "-DSTEINOPS_WITH_CUDA=1",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        "-DTORCH_EXTENSION_NAME=_C",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        "-Xcompiler",
        "-fPIC",
    ]
    cmd += list(getattr(cpp_extension, "COMMON_NVCC_FLAGS", []))  # -D__CUDA_NO_HALF_OPERATORS__ etc.
    torch_include = Path(cpp_extension.include_paths()[0])
    if not (torch_include / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").is_file():
        cmd.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return cmd


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, CUDA_HOME, CUDA_PATH, /usr/local/cuda): cannot compile csrc/cuda")
@pytest.mark.skipif(sys.platform == "win32", reason="the compile check uses Linux/macOS flags")
@pytest.mark.parametrize("src", CUDA_SOURCES, ids=[p.name for p in CUDA_SOURCES])
def test_cuda_source_compiles(src: Path, tmp_path: Path):
    obj = tmp_path / (src.stem + ".o")
    cmd = _compile_command(NVCC, src, obj)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        # Keep the report readable: the errors, not the header warnings.
        lines = (proc.stdout + proc.stderr).splitlines()
        errors = [ln for ln in lines if "error" in ln.lower()] or lines[-60:]
        pytest.fail(
            f"nvcc failed to compile {src.relative_to(ROOT)} (rc={proc.returncode}, {elapsed:.0f} s)\n"
            f"command: {' '.join(cmd)}\n" + "\n".join(errors[:80]),
            pytrace=False,
        )
    assert obj.is_file() and obj.stat().st_size > 0, "nvcc returned 0 but wrote no object file"
    print(f"compiled {src.name} in {elapsed:.1f} s")


def test_there_are_cuda_sources():
    assert CUDA_SOURCES, "csrc/cuda/*.cu is empty: the CUDA backend has no sources"
