"""Build script for adaptau.

The project's metadata, dependencies and packages are in pyproject.toml; this file builds
only the extension ``adaptau._C``, from ``csrc/*.cpp`` with torch.utils.cpp_extension
(ninja). When the installed torch has CUDA, ``csrc/cuda/*.cu`` and the CUDA tensor glue
``csrc/cuda/*.cpp`` are added and the extension becomes a CUDAExtension.

Install without build isolation so the extension is built against the torch you run:
    pip install --no-build-isolation -e ".[test]"
TorchRec sharded tables (``adaptau train --shard-tables``), in this order:
    pip install --no-build-isolation -e ".[test,torchrec]" && pip install --no-deps torchrec==1.9.2
"""
import glob
import os

from setuptools import setup

import torch
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME

HERE = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("ADAPTAU_NO_EXTENSION") == "1":
        return []
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not cpp_sources:
        return []
    use_cuda = (
        torch.version.cuda is not None
        and CUDA_HOME is not None
        and os.environ.get("ADAPTAU_NO_CUDA") != "1"
    )
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]
    if os.environ.get("ADAPTAU_NATIVE", "1") == "1":
        cxx_flags.append("-march=native")
    extra_link = ["-fopenmp"]
    if use_cuda:
        sources = cpp_sources + sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        return [
            CUDAExtension(
                "adaptau._C",
                sources,
                extra_compile_args={
                    "cxx": cxx_flags + ["-DADAPTAU_WITH_CUDA"],
                    "nvcc": ["-O3", "-std=c++17", "-DADAPTAU_WITH_CUDA"],
                },
                extra_link_args=extra_link,
            )
        ]
    return [
        CppExtension(
            "adaptau._C",
            cpp_sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=extra_link,
        )
    ]


setup(
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
