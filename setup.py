"""Packaging for yuanlfa (pure Python for now; optional C++ helpers will live in csrc/)."""

from __future__ import annotations

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent

setup(
    name="yuanlfa",
    version="0.1.0",
    description=(
        "Train Yuan 2.0-style LLMs (Localized Filtering-based Attention) with tensor, "
        "non-uniform pipeline and data parallelism"
    ),
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["yuanlfa", "yuanlfa.*"]),
    # torch is a range: CPU users pin torch==2.13.0 first, GPU users bring their own CUDA build.
    install_requires=["torch>=2.4", "numpy>=1.24", "pyyaml>=6.0", "tqdm>=4.60"],
    extras_require={
        "tensorboard": ["tensorboard>=2.12"],
        "triton": ["triton>=3.0"],
        # yuanlfa-plan --plot
        "plot": ["matplotlib>=3.5"],
        # yuanlfa-reshard to and from the Hugging Face format
        "hf": ["safetensors>=0.4"],
        # triton runs the LFA kernels' tests on CPU through its interpreter.
        "dev": [
            "matplotlib>=3.5",
            "pytest>=8",
            "ruff>=0.5",
            "safetensors>=0.4",
            "tensorboard>=2.12",
            "triton>=3.0; platform_system=='Linux'",
        ],
    },
    entry_points={
        "console_scripts": [
            "yuanlfa-train=yuanlfa.cli.train:main",
            "yuanlfa-info=yuanlfa.cli.info:main",
            "yuanlfa-preprocess=yuanlfa.cli.preprocess:main",
            "yuanlfa-plan=yuanlfa.cli.plan:main",
            "yuanlfa-reshard=yuanlfa.cli.reshard:main",
        ]
    },
)
