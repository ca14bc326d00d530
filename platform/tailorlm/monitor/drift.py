"""How far a window of served prompts is from the training data: one small function per measure,
no model and no Ray, so each is tested on generated inputs (tests/unit/test_drift.py).

- unigram KL: KL(traffic || training) of the word distributions (train/evaluate.fact_words:
  lowercased, punctuation dropped, CJK split into characters), with additive smoothing over the
  union vocabulary so that a word one side never saw costs a finite amount;
- length histogram: the share of prompts per word-count bin, for both sides;
- language mix: the share of prompts per language (the data stage's fastText LanguageID);
- domain relevance: the mean TF-IDF cosine to the training prompts (the data stage's
  DomainRelevance scorer, fitted on them), for the traffic and for training's own eval prompts.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Iterable

LENGTH_BINS = (0, 4, 8, 16, 32, 64, 128, 256, 512)  # lower edges, in words; the last bin is open


def unigrams(texts: Iterable[str]) -> Counter:
    from tailorlm.train.evaluate import fact_words

    counts: Counter = Counter()
    for text in texts:
        counts.update(fact_words(text or ""))
    return counts


def kl_divergence(p: Counter, q: Counter, alpha: float = 0.1) -> float:
    """KL(P || Q) in nats, each side smoothed: (count + alpha) / (total + alpha * |V|) over the
    union vocabulary V. 0 for identical distributions; never negative, never infinite."""
    vocab = set(p) | set(q)
    if not vocab:
        return 0.0
    np_, nq = sum(p.values()) + alpha * len(vocab), sum(q.values()) + alpha * len(vocab)
    terms = []
    for w in vocab:
        pw, qw = (p.get(w, 0) + alpha) / np_, (q.get(w, 0) + alpha) / nq
        terms.append(pw * math.log(pw / qw))
    kl = math.fsum(terms)  # exactly rounded: the same for any order of the words (a property test)
    return max(kl, 0.0)  # float rounding can leave -1e-17 on identical inputs


def length_histogram(texts: Iterable[str]) -> dict[str, float]:
    """Share of texts per word-count bin ('0-3', '4-7', ..., '512+')."""
    labels = [f"{lo}-{hi - 1}" for lo, hi in zip(LENGTH_BINS, LENGTH_BINS[1:])] + [f"{LENGTH_BINS[-1]}+"]
    counts = [0] * len(labels)
    n = 0
    for text in texts:
        words = len((text or "").split())
        counts[sum(1 for lo in LENGTH_BINS[1:] if words >= lo)] += 1
        n += 1
    return {label: c / n if n else 0.0 for label, c in zip(labels, counts)}


def shares(values: Iterable[str]) -> dict[str, float]:
    """Share of each value, largest first."""
    counts = Counter(values)
    n = sum(counts.values())
    return {k: v / n for k, v in counts.most_common()} if n else {}


def language_mix(texts: list[str]) -> dict[str, float]:
    from tailorlm.data.filters import LanguageID

    return shares(lang for lang, _ in LanguageID()(texts)) if texts else {}


def mean_relevance(reference: list[str], texts: list[str]) -> float | None:
    """Mean TF-IDF cosine of texts to the reference corpus's centroid (data/filters.DomainRelevance)."""
    import tempfile

    from tailorlm.data.filters import DomainRelevance

    if not reference or not texts:
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8") as fh:  # it reads a file
        fh.write("\n".join(" ".join(t.split()) for t in reference))
        fh.flush()
        scorer = DomainRelevance([], fh.name)
    return float(scorer(texts).mean())


def prompt_of(row: dict) -> str:
    """What a user sent: a text row's text, or a chat row's user turns."""
    messages = row.get("messages")
    if isinstance(messages, str):  # the data stage keeps chat turns as JSON text
        import json

        messages = json.loads(messages) if messages else None
    if messages:
        return "\n".join(m.get("content") or "" for m in messages if m.get("role") == "user")
    return row.get("text") or ""


def prompts(rows: list[dict]) -> list[str]:
    """What users would send, of a split's rows: the user turns of its chat rows where it has any
    (its plain-text rows, documents for continued pretraining, are nobody's prompt: a window of
    questions measured against questions and documents alerted on in-domain traffic, 0.33 nats
    above the floor on the demo), else its texts."""
    chats = [r for r in rows if r.get("messages")]
    return [p for p in map(prompt_of, chats or rows) if p]
