"""Synthetic corpora with planted near-duplicates, for the dedup benchmarks and tests.

    python -m tailorlm.bench.corpus --docs 100000 --out /tmp/corpus   # corpus.jsonl + planted.csv

Documents are English-like (words drawn with a Zipf distribution from a random vocabulary) or
Chinese (characters, no spaces). A planted group is an original plus one edited copy; the edit
kinds are the ones users meet: substitutions, insertions, deletions, adjacent swaps, shuffled
chunks and truncations at several rates, and formatting-only changes (whitespace, case,
punctuation, appended boilerplate). `planted.csv` lists every planted pair with its edit kind and
its true word-5-gram Jaccard, the truth precision and recall are measured against.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pandas as pd

EDITS_EN = [
    "whitespace",
    "case",
    "punctuation",
    "boilerplate",
    "substitute_2pct",
    "substitute_5pct",
    "substitute_10pct",
    "substitute_15pct",
    "insert_2pct",
    "insert_5pct",
    "insert_10pct",
    "delete_2pct",
    "delete_5pct",
    "delete_10pct",
    "swap_2pct",
    "swap_5pct",
    "shuffle_chunks",
    "truncate_10pct",
    "truncate_20pct",
    "truncate_40pct",
]
EDITS_ZH = ["zh_whitespace", "zh_punctuation", "zh_substitute_3pct", "zh_truncate_10pct", "zh_substitute_20pct"]
BOILERPLATE = "subscribe to our newsletter for weekly updates and read our privacy policy before you continue"


def _vocab(rng: np.random.Generator, n: int = 20000) -> np.ndarray:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return np.array(["".join(rng.choice(letters, rng.integers(2, 9))) for _ in range(n)])


def make_docs(rng: np.random.Generator, n: int, words: int = 200) -> list[str]:
    vocab = _vocab(rng)
    p = 1.0 / np.arange(1, len(vocab) + 1) ** 1.05
    p /= p.sum()
    lens = rng.integers(words // 2, words * 3 // 2, n)
    idx = rng.choice(len(vocab), size=int(lens.sum()), p=p)
    out, pos = [], 0
    for ln in lens:
        out.append(" ".join(vocab[idx[pos : pos + ln]]) + ".")
        pos += ln
    return out


def make_zh_docs(rng: np.random.Generator, n: int, chars: int = 150) -> list[str]:
    pool = np.array([chr(c) for c in range(0x4E00, 0x4E00 + 3000)])
    return ["".join(rng.choice(pool, rng.integers(chars // 2, chars * 3 // 2))) + "。" for _ in range(n)]


def _rate(kind: str) -> float:
    return int(kind.split("_")[-1].removesuffix("pct")) / 100


def _new_word(rng: np.random.Generator) -> str:
    return "zz" + "".join(rng.choice(list("qxjk"), 5))


def edit(text: str, kind: str, rng: np.random.Generator) -> str:
    """One edited copy of text; kind is one of EDITS_EN or EDITS_ZH."""
    if kind.startswith("zh_"):
        chars = list(text)
        if kind == "zh_whitespace":
            return " ".join(text[i : i + 20] for i in range(0, len(text), 20))
        if kind == "zh_punctuation":
            return "，".join(text[i : i + 15] for i in range(0, len(text), 15))
        if kind.startswith("zh_substitute"):
            for i in rng.choice(len(chars), max(1, int(len(chars) * _rate(kind))), replace=False):
                chars[i] = chr(0x4E00 + 3000 + int(rng.integers(0, 1000)))
            return "".join(chars)
        return text[: int(len(text) * 0.9)]
    words = text.split()
    n = len(words)
    if kind == "whitespace":
        return "  ".join(words[:50]) + "\n\n" + " \t".join(words[50:])
    if kind == "case":
        return " ".join(w.upper() if rng.random() < 0.3 else w.title() if rng.random() < 0.3 else w for w in words)
    if kind == "punctuation":
        return " ".join(w + rng.choice([",", ";", ".", "!"]) if rng.random() < 0.15 else w for w in words)
    if kind == "boilerplate":
        return text + " " + BOILERPLATE
    if kind == "shuffle_chunks":  # four blocks of the text in another order
        cut = np.linspace(0, n, 5).astype(int)
        chunks = [words[cut[i] : cut[i + 1]] for i in range(4)]
        return " ".join(w for i in (2, 0, 3, 1) for w in chunks[i])
    k = max(1, int(n * _rate(kind)))
    if kind.startswith("substitute"):
        for i in rng.choice(n, k, replace=False):
            words[i] = _new_word(rng)
        return " ".join(words)
    if kind.startswith("insert"):
        for i in sorted(rng.choice(n, k, replace=False), reverse=True):
            words.insert(int(i), _new_word(rng))
        return " ".join(words)
    if kind.startswith("delete"):
        gone = set(rng.choice(n, k, replace=False).tolist())
        return " ".join(w for i, w in enumerate(words) if i not in gone)
    if kind.startswith("swap"):  # adjacent words trade places
        for i in rng.choice(n - 1, k, replace=False):
            words[i], words[i + 1] = words[i + 1], words[i]
        return " ".join(words)
    if kind.startswith("truncate"):
        return " ".join(words[: int(n * (1 - _rate(kind)))])
    raise ValueError(f"unknown edit kind {kind!r}")


def planted_corpus(n_docs: int, planted_fraction: float = 0.1, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(docs with id and text, planted pairs with a, b, kind, jaccard). About planted_fraction of
    the documents are edited copies, the edit kinds in equal shares, one Chinese pair in five;
    the other documents are unrelated. Rows are shuffled so copies are not next to their originals."""
    from tailorlm.data.minhash import exact_jaccard

    rng = np.random.default_rng(seed)
    kinds = EDITS_EN * 4 + EDITS_ZH * 4  # 80 English, 20 Chinese kinds per cycle of 100
    n_pairs = int(n_docs * planted_fraction) if n_docs >= 2 else 0
    pair_kinds = [kinds[i % len(kinds)] for i in range(n_pairs)]
    n_zh_pairs = sum(k.startswith("zh_") for k in pair_kinds)
    n_background = n_docs - 2 * n_pairs
    n_zh_bg = n_background // 10
    en = make_docs(rng, n_pairs - n_zh_pairs + n_background - n_zh_bg)
    zh = make_zh_docs(rng, n_zh_pairs + n_zh_bg)
    en_it, zh_it = iter(en), iter(zh)
    ids, texts, planted = [], [], []
    for g, kind in enumerate(pair_kinds):
        orig = next(zh_it) if kind.startswith("zh_") else next(en_it)
        copy = edit(orig, kind, rng)
        a, b = f"g{g:07d}-a", f"g{g:07d}-b"
        ids += [a, b]
        texts += [orig, copy]
        planted.append((a, b, kind, orig, copy))
    for i, t in enumerate(list(en_it) + list(zh_it)):
        ids.append(f"bg{i:07d}")
        texts.append(t)
    order = rng.permutation(len(ids))
    docs = pd.DataFrame({"id": np.array(ids, dtype=object)[order], "text": np.array(texts, dtype=object)[order]})
    jac = exact_jaccard([p[3] for p in planted], [p[4] for p in planted]) if planted else []
    pairs = pd.DataFrame(
        {"a": [p[0] for p in planted], "b": [p[1] for p in planted], "kind": [p[2] for p in planted], "jaccard": jac}
    )
    return docs, pairs


def write_corpus(docs: pd.DataFrame, pairs: pd.DataFrame, out: str) -> tuple[str, str]:
    """corpus.jsonl ({"id", "text"} per line) and planted.csv under the folder out."""
    os.makedirs(out, exist_ok=True)
    path, truth = os.path.join(out, "corpus.jsonl"), os.path.join(out, "planted.csv")
    with open(path, "w", encoding="utf-8") as fh:
        for i, t in zip(docs["id"], docs["text"]):
            fh.write(json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n")
    pairs.to_csv(truth, index=False)
    return path, truth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=10_000)
    ap.add_argument("--planted-fraction", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="folder for corpus.jsonl and planted.csv")
    args = ap.parse_args()
    docs, pairs = planted_corpus(args.docs, args.planted_fraction, args.seed)
    print(*write_corpus(docs, pairs, args.out))


if __name__ == "__main__":
    main()
