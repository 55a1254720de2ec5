"""The default model's vocabulary as a VocabIndex, built once per session."""

from __future__ import annotations

import pytest

from model.structured import VocabIndex


@pytest.fixture(scope="session")
def default_vocab(default_model_dir) -> VocabIndex:
    from model.text.tokenizer import Tokenizer

    return VocabIndex.from_tokenizer(Tokenizer.from_dir(default_model_dir))
