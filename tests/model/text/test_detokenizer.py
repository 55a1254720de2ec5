"""Incremental detokenizer and stop strings, on the default model's tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from model.text.detokenizer import IncrementalDetokenizer
from model.text.stop_strings import StopStringMatcher
from model.text.tokenizer import Tokenizer

TEXTS = [
    "The capital of France is Paris.",
    "emoji 🙂👍🏽🇫🇷 and a family 👨‍👩‍👧 in a row🙂🙂",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "naïve café — “quotes” ½ ∑ ≈ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "code:\n\tdef f(x):\n        return {'a': [1, 2, 3]}\n",
    "numbers 3.14159 and 1,000,000",
    "  spaces   everywhere  ",
]
PROMPT = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tok(default_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(default_model_dir)


def stream(tok: Tokenizer, text: str, stops: list[str], include: bool = False):
    """Generate ``text`` token by token through detokenizer + matcher, as the engine does.

    Returns (emitted text, matched stop, tokens consumed until the stop).
    """
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, tok.encode(PROMPT))
    matcher = StopStringMatcher(stops, include_stop_str=include)
    emitted = []
    for n, token_id in enumerate(ids, start=1):
        delta = detok.add(token_id)
        assert "\ufffd" not in delta
        safe, stop = matcher.push(delta)
        emitted.append(safe)
        if stop is not None:
            return "".join(emitted), stop, n
    emitted.append(matcher.push(detok.flush())[0])
    return "".join(emitted) + matcher.flush(), None, len(ids)


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_equals_full_decode(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, tok.encode(PROMPT))
    deltas = [detok.add(i) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tok.decode(ids) == text
    assert detok.flush() == ""


def test_multibyte_characters_split_across_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("a🙂b")
    # The emoji is two tokens; neither is valid UTF-8 alone.
    assert [tok.token_text(i) for i in ids] == ["a", "\ufffd", "\ufffd\ufffd", "b"]
    detok = IncrementalDetokenizer(tok, [])
    deltas = [detok.add(i) for i in ids]
    assert "" in deltas  # held back until the character is complete
    assert [d for d in deltas if d] == ["a", "🙂", "b"]


def test_skip_special_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("Hi<|im_end|> there")
    for skip, expected in ((True, "Hi there"), (False, "Hi<|im_end|> there")):
        detok = IncrementalDetokenizer(tok, tok.encode(PROMPT), skip_special_tokens=skip)
        assert "".join(detok.add(i) for i in ids) == expected


def test_work_per_token_is_bounded(tok: Tokenizer) -> None:
    """Each step decodes a short window, never the whole sequence."""
    widths = []
    real_decode = tok.decode

    class Spy:
        skipped_special_ids = tok.skipped_special_ids

        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            widths.append(len(ids))
            return real_decode(ids, skip_special_tokens)

    ids = tok.encode("A long answer with emoji 🙂 and 漢字. " * 60)
    detok = IncrementalDetokenizer(Spy(), tok.encode(PROMPT))  # type: ignore[arg-type]
    text = "".join(detok.add(i) for i in ids)
    assert text == tok.decode(ids)
    assert len(ids) > 500 and max(widths) <= 8


def test_stray_bytes_do_not_grow_the_window(tok: Tokenizer) -> None:
    """A model emitting invalid UTF-8 (lone continuation bytes) still streams in bounded work."""
    stray = tok.encode("\U00040000")[0]  # 0x80: a continuation byte with no lead byte
    assert tok.token_bytes(stray) == b"\x80"
    ids = [*tok.encode("ok "), *[stray] * 40, *tok.encode("🙂 done")]
    widths = []
    real_decode = tok.decode

    class Spy:
        skipped_special_ids = tok.skipped_special_ids

        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            widths.append(len(ids))
            return real_decode(ids, skip_special_tokens)

    detok = IncrementalDetokenizer(Spy(), [])  # type: ignore[arg-type]
    deltas = [detok.add(i) for i in ids]
    assert "".join(deltas) + detok.flush() == tok.decode(ids)
    assert max(widths) <= 2 * IncrementalDetokenizer.MAX_PENDING_TOKENS
    assert deltas[-1] == " done" and "🙂" in "".join(deltas)


def test_special_tokens_skipped_in_a_row(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, [])
    ids = [*tok.encode("a"), *[1, 2] * 100, *tok.encode(" b")]
    assert "".join(detok.add(i) for i in ids) == "a b"
    assert len(detok._ids) == 2  # skipped specials never enter the decode window


@settings(max_examples=60, deadline=None, database=None)
@given(text=st.text(max_size=40))
def test_incremental_equals_full_decode_random(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    # Only text the vocabulary can spell (it lacks a few byte tokens, e.g. 0xF1).
    assume("\ufffd" not in text and tok.decode(ids) == text)
    detok = IncrementalDetokenizer(tok, [])
    deltas = [detok.add(i) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + detok.flush() == tok.decode(ids)


def test_stop_string_split_across_tokens(tok: Tokenizer) -> None:
    text = "The capital of France is Paris. It is lovely."
    ids = tok.encode(text)
    assert "Paris." not in [tok.token_text(i).strip() for i in ids]  # spans two tokens
    emitted, stop, used = stream(tok, text, ["Paris."])
    assert (emitted, stop) == ("The capital of France is ", "Paris.")
    assert tok.decode(ids[:used]).endswith("Paris.")
    emitted, stop, _ = stream(tok, text, ["Paris."], include=True)
    assert (emitted, stop) == ("The capital of France is Paris.", "Paris.")


def test_stop_string_at_the_very_start(tok: Tokenizer) -> None:
    assert stream(tok, "Hello there", ["Hello"]) == ("", "Hello", 1)
    assert stream(tok, "Hello there", ["Hel"]) == ("", "Hel", 1)
    assert stream(tok, "Hello there", ["Hello"], include=True) == ("Hello", "Hello", 1)


def test_stop_string_with_multibyte_characters(tok: Tokenizer) -> None:
    emitted, stop, _ = stream(tok, "ok 🙂 bye", ["🙂"])
    assert (emitted, stop) == ("ok ", "🙂")
    emitted, stop, _ = stream(tok, "日本語のテキスト", ["テキ"])
    assert (emitted, stop) == ("日本語の", "テキ")


def test_multiple_stop_strings_first_to_complete_wins(tok: Tokenizer) -> None:
    assert stream(tok, "one two three four", ["four", "two"])[:2] == ("one ", "two")
    # "lo w" completes before "world" does, though "world" is listed first.
    assert stream(tok, "hello world", ["world", "lo w"])[:2] == ("hel", "lo w")
    assert stream(tok, "no stop here", ["xyz", "zzz"]) == ("no stop here", None, 3)


def test_matcher_holds_back_partial_matches() -> None:
    matcher = StopStringMatcher(["Paris", "\n\n"])
    assert matcher.push("The city is Pa") == ("The city is ", None)
    assert matcher.push("r") == ("", None)
    assert matcher.push("k and\n") == ("Park and", None)
    assert matcher.push("x") == ("\nx", None)
    assert matcher.push(" Pari") == (" ", None)
    assert matcher.flush() == "Pari"  # the stream ended without a match: nothing is lost


def test_matcher_chunking_does_not_matter() -> None:
    text = "abcabxabcd--stop--tail"
    for stops in (["abcd"], ["--stop--", "xab"], ["b", "abc"], ["tail"], ["zz"]):
        whole = StopStringMatcher(stops)
        expected = whole.push(text)
        expected = (expected[0] + (whole.flush() if expected[1] is None else ""), expected[1])
        for size in (1, 2, 3, 5):
            matcher = StopStringMatcher(stops)
            out, stop = [], None
            for i in range(0, len(text), size):
                safe, stop = matcher.push(text[i : i + size])
                out.append(safe)
                if stop is not None:
                    break
            if stop is None:
                out.append(matcher.flush())
            assert ("".join(out), stop) == expected, (stops, size)


def test_matcher_after_match_and_edge_cases() -> None:
    matcher = StopStringMatcher(["END"], include_stop_str=True)
    assert matcher.push("xxENDyy") == ("xxEND", "END")
    assert matcher.push("more") == ("", None)
    assert matcher.flush() == ""
    passthrough = StopStringMatcher(["", ""])
    assert passthrough.push("anything") == ("anything", None)
    assert passthrough.flush() == ""
