"""megatron-prior: PRIOR vision-language pre-training on megatron-core.

Transformer Engine and NVIDIA apex are optional accelerators used when importable; they are
never pip requirements (PyPI's ``apex`` is an unrelated project, and TE's torch part is a
CUDA source build).
"""

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

setup(
    name="megatron-prior",
    version="0.1.0",
    description="PRIOR (image-related-token-prioritised) VLM pre-training on megatron-core",
    # megatron-core 0.17+ needs Python 3.12; 0.16 and Python 3.11 are no longer tested.
    python_requires=">=3.12",
    packages=find_packages(include=["megatron_prior", "megatron_prior.*"]),
    install_requires=[
        # The tested minor version: the CPU shim (megatron_prior/compat/cpu_shim.py) patches
        # the places where it hard-codes CUDA, which move between minor versions.
        "megatron-core>=0.19.2,<0.20",
        "torch>=2.6,<2.15",
        "numpy>=1.24",
        "sentencepiece>=0.2",
        # megatron-core does not declare it, and dist_checkpointing.save hangs without it.
        "psutil>=5.9",
        "matplotlib>=3.7",
        "pillow>=10",
        "pyyaml>=6",
        "tqdm>=4.60",
        "tensorboard>=2.14",
        # Users' own models and data: Hugging Face checkpoints and tokenizers (loaded from local
        # directories, never downloaded at run time) and webdataset tar shards.
        "transformers>=4.45",
        "tokenizers>=0.15",
        "safetensors>=0.4",
        "webdataset>=0.2.90",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout>=2.3"],
    },
    ext_modules=[
        Pybind11Extension(
            "megatron_prior._packer",
            ["csrc/packer.cpp"],
            cxx_std=17,
            extra_compile_args=["-O3"],
        )
    ],
    cmdclass={"build_ext": build_ext},
)
