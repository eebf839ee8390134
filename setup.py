"""Build script for adaptau.

Builds the extension ``adaptau._C`` from ``csrc/*.cpp`` with torch.utils.cpp_extension
(ninja). When the installed torch has CUDA, ``csrc/cuda/*.cu`` and the CUDA tensor glue
``csrc/cuda/*.cpp`` are added and the extension becomes a CUDAExtension.
The Python package is ``adaptau`` with the subpackages ``adaptau.loss`` (the operator) and
``adaptau.train`` (the trainer); the Triton kernels in ``kernels/`` are installed as the
subpackage ``adaptau.kernels``.

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
    name="adaptau",
    version="0.1.0",
    description="Fused sampled-softmax loss with adaptive temperature (Adap-tau) for PyTorch recommenders",
    packages=["adaptau", "adaptau.loss", "adaptau.train", "adaptau.kernels"],
    package_dir={"adaptau": "adaptau", "adaptau.kernels": "kernels"},
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy", "scipy", "tqdm", "matplotlib", "pyyaml"],
    extras_require={
        "test": ["pytest", "pytest-timeout", "hypothesis", "scipy", "mpmath", "ninja"],
        "triton": ["triton>=3.0"],
        # --shard-tables (adaptau.train.sharded): TorchRec's pure-Python requirements and
        # fbgemm's CPU kernels, pinned to versions that load with torch 2.13.0 (fbgemm-gpu-cpu
        # 1.9.0's library does not). torchrec itself is installed afterwards with --no-deps:
        #     pip install --no-deps torchrec==1.9.2
        # because its own requirement `fbgemm-gpu` would put the CUDA build into the same
        # fbgemm_gpu package folder and break the import (see README, .ci/run).
        "torchrec": ["fbgemm-gpu-cpu==1.8.0", "tensordict==0.15.3", "torchmetrics==1.0.3",
                     "pyre-extensions", "tqdm"],
    },
    entry_points={"console_scripts": ["adaptau=adaptau.train.cli:main"]},
    zip_safe=False,
)
