"""Fixtures shared by the whole test suite."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The prepared default model folder; pulled once into $NANOSERVE_HOME or ~/.cache/nanoserve."""
    from model.default_model import ensure_default_model

    return ensure_default_model()
