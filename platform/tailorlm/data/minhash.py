"""MinHash signatures and LSH band keys, vectorized over a whole batch of documents.

No Ray here, so the benchmark and the tests can call it directly. Why not datasketch: it hashes
shingle by shingle in Python (about 2.5k docs/s per core here). This kernel tokenizes a whole
batch in one polars call (Rust regex), hashes each distinct token once (pyarrow dictionary
encoding, then pandas' siphash, which is stable across processes, machines and versions, unlike
polars' own `hash`), forms n-gram shingles with array arithmetic and takes all permutations'
minima with one `minimum.reduceat`, which is several times faster. `tokens` is the same
tokenization in plain Python, the reference the vectorized one is tested against.

Shingles: lowercase word n-grams; for CJK text (no spaces between words) character n-grams.
Permutations: multiply-shift hashing h -> (a*h + b) >> 32 over uint64 (Dietzfelbinger et al.),
a 2-universal family, so signature agreement estimates Jaccard similarity as classic MinHash does.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from tailorlm.data.filters import CJK, cjk_fraction

_WORD = re.compile(r"\w+", re.UNICODE)
_EMPTY = np.uint32(0xFFFFFFFF)
_CHUNK = 16384  # shingles per block: 16k x 128 perms x 8 bytes = 16 MiB of temporaries


def tokens(text: str) -> tuple[list[str], bool]:
    """(tokens, is_cjk): words, or non-space characters for CJK-heavy text."""
    if cjk_fraction(text) > 0.3:
        return [c for c in text if c.isalnum()], True
    return _WORD.findall(text.lower()), False


def _params(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd
    b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
    return a, b


def token_hashes(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectorized `tokens` over a batch: (uint64 hash of every token in document order, tokens per
    document, is_cjk per document)."""
    import polars as pl
    import pyarrow.compute as pc

    s = pl.Series(texts, dtype=pl.String)
    nonspace = s.str.len_chars() - s.str.count_matches(" ", literal=True)
    cjk = (s.str.count_matches(CJK.pattern) > 0.3 * nonspace).to_numpy()
    # Rust's Unicode \w+ and [\p{L}\p{N}] agree with Python's \w+ and str.isalnum on composed
    # (NFKC) text; on combining marks Rust keeps a word whole where Python splits it.
    words = s.filter(~cjk).str.to_lowercase().str.extract_all(r"\w+")
    chars = s.filter(cjk).str.extract_all(r"[\p{L}\p{N}]")
    order = np.empty(len(texts), dtype=np.int64)  # position of each document in words ++ chars
    order[~cjk] = np.arange(len(words))
    order[cjk] = len(words) + np.arange(len(chars))
    toks = pl.concat([words, chars]).gather(order)
    lens = toks.list.len().to_numpy().astype(np.int64)
    flat = toks.explode(empty_as_null=False).to_arrow()
    if len(flat) == 0:
        return np.zeros(0, dtype=np.uint64), lens, cjk
    # hash each distinct token once: a batch has far fewer distinct tokens than tokens
    enc = pc.dictionary_encode(flat)
    distinct = pd.util.hash_array(enc.dictionary.to_numpy(zero_copy_only=False), categorize=False)
    return distinct[enc.indices.to_numpy()], lens, cjk


def shingle_hashes(texts: list[str], ngram: int, cjk_ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """All shingle hashes of a batch, sorted by document, and each document's shingle count."""
    th, lens, cjk = token_hashes(texts)
    ns = np.where(cjk, cjk_ngram, ngram).astype(np.int64)
    if len(th) == 0:
        return np.zeros(0, dtype=np.uint64), np.zeros(len(texts), dtype=np.int64)
    total = len(th)
    doc_start = np.concatenate([[0], np.cumsum(lens)[:-1]])
    doc_end = doc_start + lens
    pos = np.arange(total)
    end = np.repeat(doc_end, lens)
    start = np.repeat(doc_start, lens)
    n_of = np.repeat(ns, lens)
    # a shingle starts at every position with a full n-gram after it, and at the start of a doc
    # shorter than n (one shingle of all its tokens)
    valid = (pos + n_of <= end) | (pos == start)
    h = np.zeros(total, dtype=np.uint64)
    mult = np.uint64(0x9E3779B97F4A7C15)
    for j in range(int(ns.max())):
        idx = pos + j
        inside = (idx < end) & (j < n_of)
        term = th[np.minimum(idx, total - 1)] * (mult + np.uint64(2 * j))
        h = h * np.uint64(31) + np.where(inside, term, np.uint64(0))
    h = h[valid]
    counts = np.bincount(np.repeat(np.arange(len(texts)), lens)[valid], minlength=len(texts))
    return h, counts


def signatures(texts: list[str], num_perm: int = 128, ngram: int = 5, cjk_ngram: int = 5, seed: int = 1) -> np.ndarray:
    """(n_docs, num_perm) uint32 MinHash signatures; a document with no tokens gets all 0xFFFFFFFF."""
    h, counts = shingle_hashes(texts, ngram, cjk_ngram)
    a, b = _params(num_perm, seed)
    sig = np.full((num_perm, len(texts)), _EMPTY, dtype=np.uint32)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    shift = np.uint64(32)
    d = 0
    while d < len(texts):
        # take whole documents until the block holds about _CHUNK shingles
        e = max(int(np.searchsorted(offsets, offsets[d] + _CHUNK, side="right")) - 1, d + 1)
        lo, hi = offsets[d], offsets[e]
        docs = np.arange(d, e)[counts[d:e] > 0]
        if hi > lo:
            # (num_perm, shingles) layout: each permutation's row is contiguous, so the
            # per-document minima (reduceat along axis 1) run over contiguous memory, ~6x faster
            # than the transposed layout.
            vals = np.multiply(a[:, None], h[None, lo:hi])
            vals += b[:, None]
            vals >>= shift
            sig[:, docs] = np.minimum.reduceat(vals, offsets[docs] - lo, axis=1)
        d = e
    return np.ascontiguousarray(sig.T)


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n_docs, bands) uint64 bucket keys; the band index is mixed in so bands never collide."""
    n = sig.shape[0]
    x = sig[:, : bands * rows].astype(np.uint64).reshape(n, bands, rows)
    rng = np.random.default_rng(7)
    coef = rng.integers(1, 2**63, size=rows, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    band_salt = rng.integers(0, 2**63, size=bands, dtype=np.uint64)
    key = (x * coef[None, None, :]).sum(axis=2, dtype=np.uint64) + band_salt[None, :]
    key ^= key >> np.uint64(31)
    key *= np.uint64(0xBF58476D1CE4E5B9)
    key ^= key >> np.uint64(29)
    return key


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
    return (sig_a == sig_b).mean(axis=-1)


def exact_jaccard(texts_a: list[str], texts_b: list[str], ngram: int = 5, cjk_ngram: int = 5) -> np.ndarray:
    """Exact shingle-set Jaccard of each pair (texts_a[i], texts_b[i]); two empty sets count as equal."""
    m = len(texts_a)
    h, counts = shingle_hashes(list(texts_a) + list(texts_b), ngram, cjk_ngram)
    doc = np.repeat(np.arange(2 * m), counts)
    sets = pd.DataFrame({"pair": doc % m, "side": doc // m, "h": h}).drop_duplicates()
    pair = sets["pair"].to_numpy()
    size = np.bincount(pair, minlength=m)  # |A| + |B|
    # a shingle of the pair seen on both sides (each side's set is already unique) is shared
    inter = np.bincount(pair[sets.duplicated(["pair", "h"]).to_numpy()], minlength=m)
    union = size - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def true_jaccard(text_a: str, text_b: str, ngram: int = 5, cjk_ngram: int = 5) -> float:
    """Exact shingle-set Jaccard of one pair, for benchmarks and tests."""
    return float(exact_jaccard([text_a], [text_b], ngram, cjk_ngram)[0])
