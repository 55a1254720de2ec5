"""Tokenizer: encode/decode parity with HF AutoTokenizer, token bytes, stop tokens, load errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from model.errors import ModelLoadError
from model.text.tokenizer import Tokenizer

TEXTS = [
    "Hello, world!",
    "The year 2024 had 366 days; π ≈ 3.14159.",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew\n\nlines\r\n",
    "naïve café déjà vu — “quotes”",
    "日本語のテキストと中文文本",
    "emoji: 🙂👍🏽🇫🇷 family: 👨‍👩‍👧",
    "code: def f(x):\n    return x**2  # comment",
    "<|im_start|>user\nhi<|im_end|>\n",
    "",
    "1234567890 000",
    "Привет, мир! مرحبا بالعالم",
]


@pytest.fixture(scope="module")
def ours(default_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(default_model_dir)


@pytest.fixture(scope="module")
def hf(default_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_hf(ours: Tokenizer, hf, text: str) -> None:
    ids = ours.encode(text)
    assert ids == hf.encode(text, add_special_tokens=False)
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(
            ids, skip_special_tokens=skip
        )
    assert ours.decode(ids, skip_special_tokens=False) == text


def test_digits_are_split_one_by_one(ours: Tokenizer) -> None:
    ids = ours.encode("12345")
    assert [ours.token_text(i) for i in ids] == ["1", "2", "3", "4", "5"]


def test_token_bytes_and_text(ours: Tokenizer) -> None:
    for text in TEXTS:
        ids = ours.encode(text)
        assert b"".join(ours.token_bytes(i) for i in ids) == text.encode("utf-8")
    emoji_ids = ours.encode("🙂")
    assert len(emoji_ids) > 1  # split across tokens: each piece alone is not valid UTF-8
    assert ours.token_text(emoji_ids[0]) == "\ufffd"
    assert ours.token_bytes(2) == b"<|im_end|>"
    assert ours.token_text(2) == "<|im_end|>"


def test_special_tokens_and_eos(ours: Tokenizer, hf) -> None:
    assert ours.vocab_size == 49152
    assert ours.bos_token == "<|im_start|>"
    assert ours.eos_token == "<|im_end|>"
    assert ours.eos_token_ids == {2}
    assert ours.all_special_ids == set(range(17))
    assert set(hf.all_special_ids) <= ours.all_special_ids


def _copy_tokenizer(src: Path, dst: Path, **configs: dict) -> Path:
    dst.mkdir()
    shutil.copy(src / "tokenizer.json", dst / "tokenizer.json")
    for name, content in configs.items():
        (dst / f"{name}.json").write_text(json.dumps(content))
    return dst


def test_eos_ids_from_all_sources(default_model_dir: Path, tmp_path: Path) -> None:
    folder = _copy_tokenizer(
        default_model_dir,
        tmp_path / "m",
        tokenizer_config={"eos_token": {"content": "<|endoftext|>", "special": True}},
        generation_config={"eos_token_id": [2, 7]},
        config={"eos_token_id": 5},
    )
    tok = Tokenizer.from_dir(folder)
    assert tok.eos_token == "<|endoftext|>"
    assert tok.eos_token_ids == {0, 2, 5, 7}
    only_int = _copy_tokenizer(
        default_model_dir, tmp_path / "n", generation_config={"eos_token_id": 3}
    )
    assert Tokenizer.from_dir(only_int).eos_token_ids == {3}


def test_load_errors_name_the_file(default_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json: missing"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{ not json")
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json: cannot be loaded"):
        Tokenizer.from_dir(tmp_path)
    folder = _copy_tokenizer(default_model_dir, tmp_path / "m")
    (folder / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(ModelLoadError, match=r"tokenizer_config\.json: cannot be read"):
        Tokenizer.from_dir(folder)
