"""Packaging for yuanlfa: pure Python plus an optional C++ extension built from csrc/.

``yuanlfa._index_helpers`` (the packed dataset's sample index) is built when pybind11 and a C++
compiler are present; pyproject.toml lists pybind11 as a build requirement so pip fetches it.
Without either, or if the build fails, setup.py warns and installs the package without it:
``yuanlfa.data.index_helpers`` falls back to the equal numpy code. Set YUANLFA_REQUIRE_CPP=1 to
make a failed build an error instead (e.g. in CI that must test the extension).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, ExecError, PlatformError

ROOT = Path(__file__).parent
REQUIRE_CPP = os.environ.get("YUANLFA_REQUIRE_CPP") == "1"


def warn(message: str) -> None:
    # pip shows a successful build's output only with -v; have_cpp() tells at run time.
    print(
        f"WARNING (yuanlfa): {message}; installing without the C++ extension, the numpy "
        "fallback is used instead",
        file=sys.stderr,
    )


class OptionalBuildExt(build_ext):
    """build_ext that turns a missing compiler or a failed compile into a warning."""

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except (CCompilerError, ExecError, PlatformError, OSError) as exc:
            if REQUIRE_CPP:
                raise
            warn(f"could not build {ext.name} ({exc})")


def extensions() -> list[Extension]:
    try:
        from pybind11.setup_helpers import Pybind11Extension
    except ImportError:
        if REQUIRE_CPP:
            raise
        warn("pybind11 is not installed (pip install pybind11, or let pip build in isolation)")
        return []
    ext = Pybind11Extension(
        "yuanlfa._index_helpers",
        ["csrc/index_helpers.cpp"],
        cxx_std=17,
        # -O3 is GCC/Clang syntax; MSVC gets pybind11's defaults.
        extra_compile_args=[] if sys.platform == "win32" else ["-O3", "-ffp-contract=off"],
    )
    # optional: setuptools then skips copying a missing .so into the source tree (editable).
    ext.optional = not REQUIRE_CPP
    return [ext]


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
    ext_modules=extensions(),
    cmdclass={"build_ext": OptionalBuildExt},
    # torch is a range: CPU users pin torch==2.13.0 first, GPU users bring their own CUDA build.
    install_requires=["torch>=2.4", "numpy>=1.24", "pyyaml>=6.0", "tqdm>=4.60"],
    extras_require={
        "tensorboard": ["tensorboard>=2.12"],
        # A CUDA build of torch brings the triton it was built with; this extra is for CPU installs
        # that want the interpreter. The dev extra pins what torch 2.13's CUDA wheels require.
        "triton": ["triton>=3.0; platform_system=='Linux'"],
        # yuanlfa-plan --plot
        "plot": ["matplotlib>=3.5"],
        # yuanlfa-reshard to and from the Hugging Face format
        "hf": ["safetensors>=0.4"],
        # SentencePiece models and Hugging Face tokenizer files (data.tokenizer)
        "tokenizers": ["sentencepiece>=0.1.99", "tokenizers>=0.15"],
        # LFA attention in megatron-core's GPT model (yuanlfa.integrations.megatron_core);
        # megatron-core itself needs only torch, numpy and packaging. Tested with 0.16.1.
        "megatron": ["megatron-core>=0.16"],
        # Islands launched one torchrun per island (parallel.islands, docs/islands.md): torchft's
        # Manager for membership and recovery, and its lighthouse. 0.2.0 is the tested version.
        "ft": ["torchft==0.2.0"],
        # triton runs the LFA kernels' tests on CPU through its interpreter.
        "dev": [
            "matplotlib>=3.5",
            "megatron-core>=0.16",
            "pytest>=8",
            "ruff>=0.5",
            "safetensors>=0.4",
            "sentencepiece>=0.1.99",
            "tokenizers>=0.15",
            "tensorboard>=2.12",
            "torchft==0.2.0",
            # The reference for Yuan 2.0's tokenizer in tests: LlamaTokenizer as Yuan used it
            # (slow, SentencePiece-based, legacy mode), which transformers 5 no longer offers.
            "transformers>=4.40,<5",
            # torch 2.13's CUDA wheels require triton 3.7.1 (their Requires-Dist), so CI compiles
            # and interprets the kernels with the triton a GPU install runs them with.
            "triton==3.7.1; platform_system=='Linux'",
        ],
    },
    entry_points={
        "console_scripts": [
            "yuanlfa-train=yuanlfa.cli.train:main",
            "yuanlfa-info=yuanlfa.cli.info:main",
            "yuanlfa-preprocess=yuanlfa.cli.preprocess:main",
            "yuanlfa-plan=yuanlfa.cli.plan:main",
            "yuanlfa-reshard=yuanlfa.cli.reshard:script",
            "yuanlfa-train-tokenizer=yuanlfa.cli.train_tokenizer:main",
            "yuanlfa-convert-args=yuanlfa.cli.convert_args:main",
        ]
    },
)
