"""Build script: the pure-Python package, plus the optional compiled extension (see csrc/).

The extension (``arrag_kernels._C`` and the C library ``libarrag_kernels``) is built by CMake +
ninja from ``CMakeLists.txt``. It is optional: when it cannot be built the package still installs
and runs on its PyTorch/Triton paths, and the reason is printed and recorded in
``arrag_kernels/_build_info.json`` (read by ``arrag_kernels._ext``).

Environment flags (``auto`` by default):

* ``ARRAG_KERNELS_BUILD_EXT=0|1|auto``: 0 skips the extension, 1 makes a failed build an error,
  auto builds when a compiler and CMake work and otherwise installs without it.
* ``ARRAG_KERNELS_BUILD_CUDA=0|1|auto``: the CUDA kernels (k-selection); auto compiles them when
  nvcc is found and falls back to a CPU-only build if that fails; 1 makes it an error.
* ``ARRAG_KERNELS_CUDA_ARCHS``: CMake CUDA architectures, default ``90`` (sm_90 code + PTX).
* ``ARRAG_KERNELS_NATIVE=1``: compile for the build machine (``-march=native``); off by default
  so a built wheel runs on any x86-64 (the hot loops are compiled per ISA level and chosen at run
  time instead).
* ``ARRAG_KERNELS_BUILD_TYPE``: CMake build type, default ``Release``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
FLAG_VALUES = ("0", "1", "auto")


def _flag(name: str) -> str:
    value = os.environ.get(name, "auto").strip().lower()
    if value not in FLAG_VALUES:
        raise SystemExit(f"{name}: expected one of {FLAG_VALUES}, got {value!r}")
    return value


def _say(msg: str) -> None:
    print(f"arrag_kernels build: {msg}", file=sys.stderr, flush=True)


def _tool(module: str, exe: str) -> str | None:
    """Path of cmake/ninja: the PyPI package's binary (build requirement) or one on PATH."""
    try:
        mod = __import__(module)
        path = Path(mod.BIN_DIR) / exe
        if path.exists():
            return str(path)
    except (ImportError, AttributeError):
        pass
    return shutil.which(exe)


def _find_nvcc() -> str | None:
    for candidate in (os.environ.get("CUDACXX"), shutil.which("nvcc")):
        if candidate and Path(candidate).exists():
            return candidate
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return None


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configures and builds CMakeLists.txt into the package directory; never fails in auto mode."""

    def run(self):
        self._outputs: list[str] = []
        inplace = self.inplace or getattr(self, "editable_mode", False)
        self._out_dir = Path(self.get_ext_fullpath("arrag_kernels._C")).parent if not inplace else ROOT / "arrag_kernels"
        self._out_dir.mkdir(parents=True, exist_ok=True)
        for stale in self._out_dir.glob("*.so"):  # outputs of an earlier build must not outlive a skipped one
            if stale.name.startswith(("_C.", "libarrag_kernels")):
                stale.unlink()
        info = {"ext": False, "cuda": False, "reason": "", "cuda_reason": ""}
        mode = _flag("ARRAG_KERNELS_BUILD_EXT")
        if mode == "0":
            info["reason"] = "disabled by ARRAG_KERNELS_BUILD_EXT=0"
            _say(f"skipping the compiled extension: {info['reason']}")
        else:
            try:
                info.update(self._build_all())
                info["ext"] = True
            except (OSError, subprocess.CalledProcessError, RuntimeError) as e:
                if mode == "1":
                    raise RuntimeError(f"ARRAG_KERNELS_BUILD_EXT=1 but the extension failed to build: {e}") from e
                info["reason"] = f"build failed: {e}"
                _say(f"skipping the compiled extension ({info['reason']}); set ARRAG_KERNELS_BUILD_EXT=1 to make this an error")
        info_path = self._out_dir / "_build_info.json"
        info_path.write_text(json.dumps(info, indent=1) + "\n")
        self._outputs.append(str(info_path))

    def get_outputs(self):
        return list(getattr(self, "_outputs", []))

    def _build_all(self) -> dict:
        cmake = _tool("cmake", "cmake")
        if cmake is None:
            raise RuntimeError("cmake not found (pip install cmake)")
        cuda_mode = _flag("ARRAG_KERNELS_BUILD_CUDA")
        if cuda_mode == "0":
            self._cmake(cmake, cuda=False)
            return {"cuda_reason": "disabled by ARRAG_KERNELS_BUILD_CUDA=0"}
        nvcc = _find_nvcc()
        if nvcc is None:
            if cuda_mode == "1":
                raise RuntimeError("ARRAG_KERNELS_BUILD_CUDA=1 but nvcc was not found (set CUDACXX or CUDA_HOME)")
            _say("skipping the CUDA kernels: nvcc not found (set CUDACXX or CUDA_HOME)")
            self._cmake(cmake, cuda=False)
            return {"cuda_reason": "nvcc not found at build time"}
        try:
            self._cmake(cmake, cuda=True, nvcc=nvcc)
            return {"cuda": True}
        except subprocess.CalledProcessError as e:
            if cuda_mode == "1":
                raise
            _say(f"the CUDA build failed ({e}); building the CPU-only extension. Set ARRAG_KERNELS_BUILD_CUDA=1 to make this an error")
            self._cmake(cmake, cuda=False)
            return {"cuda_reason": f"CUDA build failed with {nvcc}"}

    def _cmake(self, cmake: str, cuda: bool, nvcc: str | None = None) -> None:
        try:
            import pybind11
        except ImportError as e:
            raise RuntimeError("pybind11 is not installed in the build environment (pip install pybind11)") from e
        build_dir = Path(self.build_temp).resolve() / ("cmake-cuda" if cuda else "cmake-cpu")
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            f"-S{ROOT}",
            f"-B{build_dir}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('ARRAG_KERNELS_BUILD_TYPE', 'Release')}",
            f"-DARRAG_OUTPUT_DIR={self._out_dir.resolve()}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DARRAG_BUILD_CUDA={'ON' if cuda else 'OFF'}",
            f"-DARRAG_NATIVE={'ON' if os.environ.get('ARRAG_KERNELS_NATIVE', '0') == '1' else 'OFF'}",
        ]
        if cuda:
            args += [f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DCMAKE_CUDA_ARCHITECTURES={os.environ.get('ARRAG_KERNELS_CUDA_ARCHS', '90')}"]
        ninja = _tool("ninja", "ninja")
        if ninja is not None:
            args += ["-GNinja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        _say(f"configuring ({'with' if cuda else 'without'} CUDA) in {build_dir}")
        subprocess.run([cmake, *args], check=True)
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", str(os.cpu_count() or 2)], check=True)
        built = sorted(p for p in self._out_dir.iterdir() if p.name.startswith(("_C.", "libarrag_kernels")))
        if not any(p.name.startswith("_C.") for p in built):
            raise RuntimeError(f"CMake finished but produced no _C module in {self._out_dir}")
        self._outputs += [str(p) for p in built]


setup(ext_modules=[CMakeExtension("arrag_kernels._C")], cmdclass={"build_ext": CMakeBuild})
