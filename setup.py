"""Build script for adaptau.

The project's metadata, dependencies and packages are in pyproject.toml; this file builds
only the extension ``adaptau._C``, from ``csrc/*.cpp`` and ``csrc/cpu/*.cpp`` with
torch.utils.cpp_extension (ninja). When the installed torch has CUDA, ``csrc/cuda/*.cu`` and
the CUDA tensor glue ``csrc/cuda/*.cpp`` are added and the extension becomes a CUDAExtension.

CPU capabilities: nothing is compiled for the build machine's CPU. The glue and the
``*_default.cpp`` kernels get the compiler's baseline flags (x86-64 without AVX, or the
target's baseline elsewhere); on x86-64 the ``csrc/cpu/*_avx2.cpp`` and ``*_avx512.cpp``
kernels are compiled again with their own flags (CAPABILITY_FLAGS) and linked in, and
``csrc/cpu/capability.cpp`` picks one at run time.

Install without build isolation so the extension is built against the torch you run:
    pip install --no-build-isolation -e ".[test]"
TorchRec sharded tables (``adaptau train --shard-tables``), in this order:
    pip install --no-build-isolation -e ".[test,torchrec]" && pip install --no-deps torchrec==1.9.2
"""

import glob
import os
import platform

from setuptools import setup

import torch
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME

HERE = os.path.dirname(os.path.abspath(__file__))


# Per-capability flags of csrc/cpu/*_<capability>.cpp, lowest first. setuptools and
# cpp_extension give every source of an extension the same flags, so BuildExtension is
# extended (build_ext below) to compile these files first with their own flags, through
# the same ninja compiler, and to link their objects after the baseline ones. Link order
# matters: an inline function from a shared header (torch, the standard library) that is
# not inlined is emitted by every object that uses it, and the linker keeps the first copy:
# the baseline objects come first, then AVX2, then AVX-512, so every shared copy is the
# lowest capability's and never needs an instruction the CPU may lack.
CAPABILITY_FLAGS = [
    ("avx2", ["-mavx2", "-mfma"]),
    ("avx512", ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx2", "-mfma"]),
]


def _is_x86_64():
    return platform.machine().lower() in ("x86_64", "amd64")


class build_ext(BuildExtension):
    """BuildExtension (ninja) plus the per-capability objects of CAPABILITY_FLAGS."""

    def build_extension(self, ext):
        objects = []
        for cap, flags in getattr(ext, "capability_sources", []):
            post = (
                dict(ext.extra_compile_args)
                if isinstance(ext.extra_compile_args, dict)
                else {"cxx": list(ext.extra_compile_args)}
            )
            post["cxx"] = list(post["cxx"]) + flags
            objects += self.compiler.compile(
                cap,
                output_dir=self.build_temp,
                macros=ext.define_macros,
                include_dirs=ext.include_dirs,
                debug=self.debug,
                extra_postargs=post,
                depends=ext.depends,
            )
        ext.extra_objects = list(ext.extra_objects or []) + objects
        super().build_extension(ext)


def _extensions():
    if os.environ.get("ADAPTAU_NO_EXTENSION") == "1":
        return []
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not cpp_sources:
        return []
    cpu_dir = os.path.join("csrc", "cpu")
    cpp_sources += [
        p
        for p in sorted(glob.glob(os.path.join(cpu_dir, "*.cpp")))
        if not any(p.endswith(f"_{cap}.cpp") for cap, _ in CAPABILITY_FLAGS)
    ]
    capability_sources = [
        (sorted(glob.glob(os.path.join(cpu_dir, f"*_{cap}.cpp"))), flags)
        for cap, flags in (CAPABILITY_FLAGS if _is_x86_64() else [])
    ]
    use_cuda = (
        torch.version.cuda is not None and CUDA_HOME is not None and os.environ.get("ADAPTAU_NO_CUDA") != "1"
    )
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]
    if os.environ.get("ADAPTAU_NATIVE") is not None:
        print(
            "adaptau setup.py: ADAPTAU_NATIVE is ignored: the extension carries default, AVX2 and "
            "AVX-512 kernels and picks one at run time (ADAPTAU_CPU_CAPABILITY forces one)"
        )
    extra_link = ["-fopenmp"]
    if use_cuda:
        sources = cpp_sources + sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        ext = CUDAExtension(
            "adaptau._C",
            sources,
            extra_compile_args={
                "cxx": cxx_flags + ["-DADAPTAU_WITH_CUDA"],
                "nvcc": ["-O3", "-std=c++17", "-DADAPTAU_WITH_CUDA"],
            },
            extra_link_args=extra_link,
        )
    else:
        ext = CppExtension(
            "adaptau._C",
            cpp_sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=extra_link,
        )
    ext.capability_sources = capability_sources
    ext.depends = sorted(glob.glob(os.path.join("csrc", "*.h")) + glob.glob(os.path.join(cpu_dir, "*.h")))
    return [ext]


setup(
    ext_modules=_extensions(),
    cmdclass={"build_ext": build_ext.with_options(use_ninja=True)},
)
