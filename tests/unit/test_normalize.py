"""normalize.repair's fast path gives ftfy's result on every text it takes, and is taken on the
text it is for (ASCII, curly quotes and dashes, CJK); anything else goes through ftfy whole."""

from __future__ import annotations

import json
import os

import ftfy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tailorlm.data.normalize import SAFE_TEXT, normalize_text, repair

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data")

# the fast path's alphabet, with what ftfy changes inside it weighted up: control characters,
# terminal escapes, carriage returns, curly quotes, fullwidth forms, the ideographic space
SPECIAL = "\x00\x07\x0b\x0c\x1b\x7f\r\n\t\u2018\u2019\u201c\u201d\u2013\u2014\u2026\u3000\u3001\uff01\uff21\uff5e"
safe_chars = st.one_of(
    st.sampled_from(list(SPECIAL)),
    st.characters(min_codepoint=0, max_codepoint=0x7F),
    st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF),
    st.characters(min_codepoint=0xFF01, max_codepoint=0xFF5E),
    st.characters(min_codepoint=0x3040, max_codepoint=0x30FF),
    st.characters(min_codepoint=0xAC00, max_codepoint=0xD7A3),
)
escape = st.sampled_from(["\x1b[31m", "\x1b[0m", "\x1b[1;32m", "\x1b["])


def ftfy_nfkc(text: str) -> str:
    return ftfy.fix_text(text, normalization="NFKC", unescape_html=False)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(safe_chars, escape), max_size=60).map("".join))
def test_fast_path_equals_ftfy(text):
    assert SAFE_TEXT.fullmatch(text)
    assert repair(text) == ftfy_nfkc(text)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=40))
def test_any_text_equals_ftfy(text):
    assert repair(text) == ftfy_nfkc(text)


MOJIBAKE = ["don\u00e2\u0080\u0099t", "don\u00e2\u20ac\u2122t", "\u00c3\u00a9t\u00c3\u00a9", "\ufb01le"]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.one_of(st.lists(safe_chars, max_size=20).map("".join), st.sampled_from(MOJIBAKE), st.text(max_size=10)))
)
def test_mixed_lines_equal_ftfy(lines):
    """Lines outside the fast path's alphabet get ftfy's full pass, the others the fast path."""
    text = "\n".join(lines)
    assert repair(text) == ftfy_nfkc(text)


@pytest.mark.parametrize(
    "text",
    MOJIBAKE,  # UTF-8 read as Latin-1 or cp1252 (ftfy's mojibake repair must still run), a ligature
)
def test_mojibake_takes_the_full_path(text):
    assert not SAFE_TEXT.fullmatch(text)
    assert repair(text) == ftfy_nfkc(text) != text


def test_real_text_equals_ftfy():
    path = os.path.join(SHARED, "c4_demo.jsonl")
    if not os.path.exists(path):
        pytest.skip("shared/data/c4_demo.jsonl is not here")
    with open(path, encoding="utf-8") as fh:
        docs = [json.loads(line)["text"] for line in fh][:150]
    assert sum(bool(SAFE_TEXT.fullmatch(d)) for d in docs) > len(docs) // 2  # the fast path is used
    for d in docs:
        assert normalize_text(d) == normalize_text_via_ftfy(d)


def normalize_text_via_ftfy(text: str) -> str:
    import tailorlm.data.normalize as n

    fast = n.repair
    n.repair = ftfy_nfkc
    try:
        return n.normalize_text(text)
    finally:
        n.repair = fast
