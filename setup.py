"""Packaging. Imports no torch and compiles nothing: the C++/CUDA sources ship as package data and
are compiled at first use (skd_kernels/_extension.py). torch is a plain requirement, so an installed
torch >= 2.11 satisfies it and pip fetches nothing."""
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent

setup(
    name="skd-kernels",
    version="0.1.0",
    description="Fused losses of Structured Knowledge Distillation for semantic segmentation (C++, CUDA, Triton)",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["skd_kernels", "skd_kernels.ops", "skd_kernels.ops.pairwise", "skd_kernels.pytorch",
              "skd_kernels.triton", "skd_kernels.csrc",
              "skd_train", "skd_train.models", "skd_train.data"],
    package_dir={"skd_kernels.csrc": "csrc", "skd_train": "python/skd_train"},
    package_data={"skd_kernels.csrc": ["*.cpp", "*/*.cpp", "*/*.h", "*/*.cu", "*/*.cuh"], "skd_train": ["configs/*.yaml"]},
    entry_points={"console_scripts": ["skd-train = skd_train.cli:main"]},
    install_requires=["torch>=2.11", "ninja"],
    # test: numpy, which the Triton interpreter (CPU tests) needs and torch does not pull in.
    # train: the reference trainer (python/skd_train): pillow reads the on-disk datasets; nibabel +
    # nilearn (its bundled MNI152 template) are the embedded default dataset "brain"; config files,
    # progress bar and loss plots (it runs without those three, with fallbacks).
    extras_require={"test": ["pytest>=8", "pytest-benchmark>=4", "numpy"],
                    "train": ["pillow", "nibabel", "nilearn>=0.10", "pyyaml", "tqdm", "matplotlib"]},
)
