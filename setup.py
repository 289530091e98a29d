"""Build torch_psembed: setup.py only drives CMake (after pybind/cmake_example).

Environment variables honoured: DEBUG=1 (Debug build), CMAKE_ARGS (extra -D flags, e.g.
``-DPSEMBED_SANITIZE=address,undefined``), CMAKE_BUILD_PARALLEL_LEVEL, CMAKE_GENERATOR (Ninja is used
when available). The version is read from CMakeLists.txt (its one home).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def read_version() -> str:
    text = (ROOT / "CMakeLists.txt").read_text()
    m = re.search(r"project\(torch_psembed VERSION ([0-9.]+)", text)
    if not m:
        raise RuntimeError("could not find the version in CMakeLists.txt")
    return m.group(1)


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: str = "") -> None:
        super().__init__(name, sources=[])
        self.sourcedir = os.fspath(Path(sourcedir).resolve())


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        ext_fullpath = Path.cwd() / self.get_ext_fullpath(ext.name)
        extdir = ext_fullpath.parent.resolve()
        debug = int(os.environ.get("DEBUG", 0)) if self.debug is None else self.debug
        cfg = "Debug" if debug else "Release"
        cmake_args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}{os.sep}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            "-DPSEMBED_BUILD_PYTHON=ON",
        ]
        try:
            import pybind11

            cmake_args.append(f"-Dpybind11_DIR={pybind11.get_cmake_dir()}")
        except ImportError:
            pass
        if "CMAKE_ARGS" in os.environ:
            cmake_args += [item for item in os.environ["CMAKE_ARGS"].split(" ") if item]
        generator = os.environ.get("CMAKE_GENERATOR", "")
        if not generator:
            try:
                import ninja  # noqa: F401

                cmake_args.append("-GNinja")
                ninja_bin = Path(ninja.BIN_DIR) / "ninja"
                if ninja_bin.exists():
                    cmake_args.append(f"-DCMAKE_MAKE_PROGRAM:FILEPATH={ninja_bin}")
            except ImportError:
                pass
        build_args = []
        if "CMAKE_BUILD_PARALLEL_LEVEL" not in os.environ:
            build_args += ["-j2"]  # a small shared machine; override with CMAKE_BUILD_PARALLEL_LEVEL
        build_temp = Path(self.build_temp) / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cmake", ext.sourcedir, *cmake_args], cwd=build_temp, check=True)
        subprocess.run(["cmake", "--build", ".", "--target", "_C", *build_args], cwd=build_temp, check=True)


setup(
    name="torch_psembed",
    version=read_version(),
    packages=find_packages(include=["torch_psembed", "torch_psembed.*"]),
    ext_modules=[CMakeExtension("torch_psembed._C", sourcedir=str(ROOT))],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
