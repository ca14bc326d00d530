"""check_quality counts with regular expressions and C builtins; the plain loops it replaced are
kept here as the reference, and the two must agree on every text."""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tailorlm.config import FilterConfig
from tailorlm.data.filters import STOPWORDS, SYMBOLS, WORD, check_quality, cjk_fraction

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data")


def _top_ngram_fraction(words, n):
    if len(words) < n + 1:
        return 0.0
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    gram, count = grams.most_common(1)[0]
    if count < 2:
        return 0.0
    return count * sum(len(w) for w in gram) / max(1, sum(len(w) for w in words))


def reference(text, cfg, language):
    """check_quality as first written: one Python loop per rule."""
    lines = [line for line in text.split("\n") if line.strip()]
    if len(lines) >= 3 and 1 - len(set(lines)) / len(lines) > cfg.max_duplicate_line_fraction:
        return "quality:duplicate_lines"
    chars = [c for c in text if not c.isspace()]
    if chars and sum(c in SYMBOLS for c in chars) / len(chars) > cfg.max_symbol_ratio:
        return "quality:symbols"
    if cjk_fraction(text) > 0.3:
        return None
    raw_words = text.split()
    if (
        raw_words
        and sum(bool(WORD.search(w)) and any(c.isalpha() for c in w) for w in raw_words) / len(raw_words)
        < cfg.min_alpha_word_fraction
    ):
        return "quality:non_alpha_words"
    words = [w.lower() for w in WORD.findall(text)]
    if not words:
        return "quality:no_words"
    mean_len = sum(map(len, words)) / len(words)
    if not cfg.min_mean_word_length <= mean_len <= cfg.max_mean_word_length:
        return "quality:word_length"
    if len(words) < cfg.quality_min_words:
        return None
    for n, slack in ((2, 0.0), (3, 0.02), (4, 0.04)):
        if _top_ngram_fraction(words, n) > cfg.max_top_ngram_fraction - slack:
            return "quality:repeated_ngrams"
    if language in (None, "en") and sum(w in STOPWORDS for w in words) < cfg.min_stopwords:
        return "quality:stopwords"
    return None


VOCAB = ["the", "of", "and", "to", "cat", "sat", "mat", "x", "日本", "über", "İstanbul", "²", "42", "_", "a_b"]
word = st.one_of(st.sampled_from(VOCAB + sorted(SYMBOLS)), st.text(min_size=1, max_size=6))
gap = st.sampled_from([" ", "  ", "\n", "\t", "\u3000", "\xa0", "\x1c"])
texts = st.lists(st.tuples(word, gap), max_size=80).map(lambda ws: "".join(w + g for w, g in ws))
configs = st.builds(
    FilterConfig, quality_min_words=st.sampled_from([0, 5, 50]), max_symbol_ratio=st.sampled_from([0.0, 0.1])
)


@settings(max_examples=300, deadline=None)
@given(texts, configs, st.sampled_from([None, "en", "de"]))
def test_agrees_with_the_plain_loops(text, cfg, language):
    assert check_quality(text, cfg, language) == reference(text, cfg, language)


@pytest.mark.parametrize("name", ["c4_demo.jsonl", "alpaca_zh_demo.json"])
def test_agrees_on_real_text(name):
    path = os.path.join(SHARED, name)
    if not os.path.exists(path):
        pytest.skip(f"shared/data/{name} is not here")
    with open(path, encoding="utf-8") as fh:
        if name.endswith(".jsonl"):
            docs = [json.loads(line)["text"] for line in fh]
        else:
            docs = [r["instruction"] + "\n" + r["output"] for r in json.load(fh)]
    cfg = FilterConfig(quality_min_words=5)
    results = [check_quality(d, cfg, "en") for d in docs]
    assert results == [reference(d, cfg, "en") for d in docs]
    assert len(set(results)) > 1  # the corpus exercises more than one outcome
