"""Fixtures shared by the whole test suite."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run under Triton's interpreter. The variable is read when triton
# is first imported (model.llama imports the fused ops), so it is set before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Engines built in the tests share inductor's cache with the servers they start (server/cli.py).
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    from model.hub.default_model import inductor_cache_dir

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_cache_dir())


def has_cxx_compiler() -> bool:
    """Whether torch.compile's CPU backend has a C++ compiler to run (else nanoserve's compiled
    decode step stays eager, and the tests that check it skip)."""
    return any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The prepared default model folder; pulled once into $NANOSERVE_HOME or ~/.cache/nanoserve."""
    from model.hub.default_model import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="module")
def hf_model(default_model_dir: Path):
    """The default model in Hugging Face transformers, fp32: the reference outputs are checked
    against (loaded per module that asks, freed after it)."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(
        default_model_dir, dtype=torch.float32
    ).eval()
