"""Dedup benchmarks: near-duplicate quality by edit kind, real text, and speed against datasketch.

    python -m tailorlm.bench.dedup quality            # planted corpus, recall by edit kind, P/R
    python -m tailorlm.bench.dedup quality --sweep    # several configurations, one line each
    python -m tailorlm.bench.dedup quality --threshold 0.8 --ngram 5 --bands 16 --rows 8   # the old default
    python -m tailorlm.bench.dedup real --paths a.jsonl b.json c.txt   # pairs found on real text
    python -m tailorlm.bench.dedup speed --docs 100000 --cpus 2
    python -m tailorlm.bench.dedup                    # quality and speed, default sizes

Quality: `bench.corpus.planted_corpus` (10k documents by default, a tenth of them edited copies:
substitutions, insertions, deletions, swaps at 2-15%, shuffled chunks, truncations of 10-40%,
formatting edits, Chinese ones; the rest unrelated). Planted-pair precision counts every predicted
pair that is not a planted one as false; recall is the share of planted pairs found. Also printed
against the old truth, pairs with true word-5-gram Jaccard >= 0.8. `--sweep` includes "peer-like",
what datatrove and Data-Juicer do (no verification: any LSH bucket collision is a duplicate).
Real: documents from files as they are (each predicted pair printed, to judge by eye), then with
edited copies of some of them planted.
Speed: our Ray Data path (signatures -> LSH buckets -> verified edges -> components) on N CPUs
against datasketch's MinHashLSH in one process with the same num_perm, bands, rows and threshold,
both end to end from in-memory texts, shingling included. Prints the ratio.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import resource
import threading
import time

import numpy as np
import pandas as pd

from tailorlm.bench.corpus import edit, make_docs, planted_corpus
from tailorlm.config import NearDedupConfig
from tailorlm.data.minhash import exact_jaccard, tokens, true_jaccard


# ----------------------------------------------------------------------------- ours
def to_dataset(df: pd.DataFrame, cpus: int):
    """Blocks of ~5k rows (from_pandas' own splitting breaks on pandas 3, so we slice)."""
    import ray

    n = max(2 * cpus, len(df) // 5000)
    step = -(-len(df) // n)
    return ray.data.from_pandas([df.iloc[i : i + step] for i in range(0, len(df), step)])


def _sign(batch: pd.DataFrame, cfg: dict) -> pd.DataFrame:
    from tailorlm.data.dedup import add_signatures

    batch["priority"] = 0
    return add_signatures(batch, NearDedupConfig.model_validate(cfg), [True] * len(batch), seed=1)


def ours(df: pd.DataFrame, cfg: NearDedupConfig, cpus: int) -> tuple[pd.DataFrame, float]:

    from tailorlm.data.dedup import near_duplicates

    t = time.time()
    ds = to_dataset(df, cpus)
    sigs = ds.map_batches(_sign, fn_kwargs={"cfg": cfg.model_dump()}, batch_format="pandas").materialize()
    dups, _ = near_duplicates(sigs, cfg, cpus)
    return dups, time.time() - t


def predicted_pairs(dups: pd.DataFrame) -> set[tuple[str, str]]:
    groups: dict[str, list[str]] = {}
    for i, rep in zip(dups["id"], dups["duplicate_of"]):
        groups.setdefault(rep, [rep]).append(i)
    return {tuple(sorted(p)) for members in groups.values() for p in itertools.combinations(members, 2)}


# ----------------------------------------------------------------------------- quality
TRUTH = 0.8  # the old promise: a pair is a duplicate when its true word-5-gram Jaccard is >= 0.8
# name -> overrides of NearDedupConfig; "peer-like" is what datatrove and Data-Juicer do (any
# bucket collision is a duplicate: the estimate's floor is below what one shared band gives)
SWEEP = {
    "old default": dict(threshold=0.8, ngram=5, bands=16, rows=8, verify="exact"),
    "peer-like": dict(threshold=0.05, ngram=5, bands=16, rows=8, verify="estimated"),
    "5-gram 0.7": dict(threshold=0.7, ngram=5, bands=16, rows=8, verify="exact"),
    "5-gram 0.6 20x5": dict(threshold=0.6, ngram=5, bands=20, rows=5, verify="exact"),
    "5-gram 0.55 32x4": dict(threshold=0.55, ngram=5, bands=32, rows=4, verify="exact"),
    "5-gram 0.5 16x8": dict(threshold=0.5, ngram=5, bands=16, rows=8, verify="exact"),
    "5-gram 0.5 20x5": dict(threshold=0.5, ngram=5, bands=20, rows=5, verify="exact"),
    "5-gram 0.5 32x4": dict(threshold=0.5, ngram=5, bands=32, rows=4, verify="exact"),
    "5-gram 0.5 32x4 est": dict(threshold=0.5, ngram=5, bands=32, rows=4, verify="estimated"),
    "5-gram 0.4 42x3": dict(threshold=0.4, ngram=5, bands=42, rows=3, verify="exact"),
    "4-gram 0.6 32x4": dict(threshold=0.6, ngram=4, bands=32, rows=4, verify="exact"),
    "3-gram 0.6 16x8": dict(threshold=0.6, ngram=3, bands=16, rows=8, verify="exact"),
    "3-gram 0.5 32x4": dict(threshold=0.5, ngram=3, bands=32, rows=4, verify="exact"),
    "3-gram 0.4 32x4": dict(threshold=0.4, ngram=3, bands=32, rows=4, verify="exact"),
    "default": {},
}


def evaluate(docs: pd.DataFrame, planted: pd.DataFrame, cfg: NearDedupConfig, cpus: int) -> dict:
    """Run near dedup on docs; planted-pair precision and recall, and against the J >= 0.8 truth."""
    dups, secs = ours(docs, cfg, cpus)
    pred = predicted_pairs(dups)
    pairs = [tuple(sorted(p)) for p in zip(planted["a"], planted["b"])]
    found = np.array([p in pred for p in pairs], dtype=bool)
    extra = sorted(pred - set(pairs))  # predicted, not planted
    text = dict(zip(docs["id"], docs["text"]))
    extra_j = exact_jaccard([text[a] for a, _ in extra], [text[b] for _, b in extra]) if extra else np.zeros(0)
    true = planted["jaccard"].to_numpy() >= TRUTH
    tp_truth = int((found & true).sum()) + int((extra_j >= TRUTH).sum())
    n_pred = max(1, len(pred))
    return {
        "secs": secs,
        "found": found,
        "predicted": len(pred),
        "not_planted": extra,
        "planted_p": (len(pred) - len(extra)) / n_pred if pred else 1.0,
        "planted_r": found.mean() if len(found) else 1.0,
        "truth_p": tp_truth / n_pred if pred else 1.0,
        "truth_r": tp_truth / max(1, int(true.sum()) + int((extra_j >= TRUTH).sum())),
    }


def _describe(cfg: NearDedupConfig) -> str:
    return (
        f"threshold {cfg.threshold}, ngram {cfg.ngram} (CJK {cfg.cjk_ngram}), num_perm {cfg.num_perm}, "
        f"bands {cfg.bands} x rows {cfg.rows}, verify {cfg.verify}"
    )


def quality(n_docs: int, cpus: int, cfg: NearDedupConfig, seed: int = 0) -> pd.DataFrame:
    """Recall by edit kind on a planted corpus, with precision and recall overall."""
    docs, planted = planted_corpus(n_docs, seed=seed)
    r = evaluate(docs, planted, cfg, cpus)
    planted = planted.assign(found=r["found"])
    if (cfg.ngram, cfg.cjk_ngram) != (5, 5):
        text = dict(zip(docs["id"], docs["text"]))
        a, b = [text[i] for i in planted["a"]], [text[i] for i in planted["b"]]
        planted["jaccard_cfg"] = exact_jaccard(a, b, cfg.ngram, cfg.cjk_ngram)
    agg = {"pairs": ("found", "size"), "mean_jaccard_5gram": ("jaccard", "mean")}
    if "jaccard_cfg" in planted:
        agg["mean_jaccard_cfg"] = ("jaccard_cfg", "mean")
    agg["recall"] = ("found", "mean")
    table = planted.groupby("kind", sort=False).agg(**agg).round(3).reset_index()
    print(f"\n== near-dup quality: {len(docs)} docs, {len(planted)} planted pairs, {_describe(cfg)} ({r['secs']:.1f}s)")
    print(table.to_string(index=False))
    print(
        f"planted pairs: precision {r['planted_p']:.3f}  recall {r['planted_r']:.3f}  "
        f"(predicted pairs {r['predicted']}, not planted {len(r['not_planted'])})"
    )
    print(f"pairs with true word-5-gram Jaccard >= {TRUTH}: precision {r['truth_p']:.3f}  recall {r['truth_r']:.3f}")
    return table


def sweep(n_docs: int, cpus: int, names: list[str], seed: int = 0) -> pd.DataFrame:
    """Several configurations on one planted corpus: one line each, then recall by edit kind."""
    docs, planted = planted_corpus(n_docs, seed=seed)
    print(f"\n== near-dup sweep: {len(docs)} docs, {len(planted)} planted pairs, num_perm 128")
    lines, by_kind = [], {}
    for name in names:
        cfg = NearDedupConfig(**SWEEP[name])
        r = evaluate(docs, planted, cfg, cpus)
        row = {
            "config": name,
            "threshold": cfg.threshold,
            "ngram": f"{cfg.ngram}/{cfg.cjk_ngram}",
            "bands": f"{cfg.bands}x{cfg.rows}",
            "verify": cfg.verify,
            "planted_P": round(r["planted_p"], 3),
            "planted_R": round(r["planted_r"], 3),
            "J>=0.8_P": round(r["truth_p"], 3),
            "J>=0.8_R": round(r["truth_r"], 3),
            "not_planted": len(r["not_planted"]),
            "secs": round(r["secs"], 1),
        }
        lines.append(row)
        print("  ".join(f"{k} {v}" for k, v in row.items()), flush=True)
        by_kind[name] = pd.Series(r["found"]).groupby(planted["kind"].to_numpy(), sort=False).mean()
    print(pd.DataFrame(lines).to_string(index=False))
    kinds = planted.groupby("kind", sort=False)["jaccard"].mean().round(3).rename("mean_jaccard_5gram")
    matrix = pd.concat([kinds, pd.DataFrame(by_kind).round(2)], axis=1)
    print("\nrecall by edit kind\n" + matrix.to_string())
    return pd.DataFrame(lines)


# ----------------------------------------------------------------------------- real text
def read_texts(paths: list[str], chunk_chars: int = 2000) -> list[str]:
    """Texts of .jsonl (text), .json (alpaca records, joined as the data stage joins them) and
    .txt files (one article a line, cut at sentence ends into documents of about chunk_chars)."""
    import json
    import re

    out: list[str] = []
    for path in paths:
        with open(path, encoding="utf-8") as fh:
            if path.endswith(".jsonl"):
                out += [json.loads(line)["text"] for line in fh if line.strip()]
            elif path.endswith(".json"):
                for r in json.load(fh):
                    user = f"{r['instruction']}\n\n{r['input']}" if (r.get("input") or "").strip() else r["instruction"]
                    out.append(f"{user}\n{r['output']}")
            else:
                for line in fh:
                    doc = ""
                    for sentence in re.split(r"(?<=[.!?])\s+", line.strip()):
                        doc = f"{doc} {sentence}".strip()
                        if len(doc) >= chunk_chars:
                            out.append(doc)
                            doc = ""
                    if len(doc) > chunk_chars // 4:
                        out.append(doc)
    return out


def real(paths: list[str], cpus: int, cfg: NearDedupConfig, per_kind: int = 10, seed: int = 0) -> None:
    """Real documents as they are (every predicted pair is listed: a real duplicate or a false
    one), then with edited copies of some of them planted (recall by edit kind on real text)."""
    from tailorlm.bench.corpus import EDITS_EN, EDITS_ZH

    texts = list(dict.fromkeys(read_texts(paths)))  # exact copies are exact dedup's business
    docs = pd.DataFrame({"id": [f"r{i:06d}" for i in range(len(texts))], "text": texts})
    print(f"\n== near-dup on real text: {len(docs)} distinct documents from {len(paths)} files, {_describe(cfg)}")
    dups, secs = ours(docs, cfg, cpus)
    pred = sorted(predicted_pairs(dups))
    text = dict(zip(docs["id"], docs["text"]))
    j = exact_jaccard([text[a] for a, _ in pred], [text[b] for _, b in pred], cfg.ngram, cfg.cjk_ngram)
    j5 = exact_jaccard([text[a] for a, _ in pred], [text[b] for _, b in pred])
    print(f"predicted pairs: {len(pred)} ({secs:.1f}s)")
    for (a, b), x, x5 in sorted(zip(pred, j, j5), key=lambda t: t[1]):
        show = lambda t: " ".join(t.split())[:90]  # noqa: E731
        print(f"  J {x:.2f} (5-gram {x5:.2f})  {show(text[a])!r}\n{'':26}{show(text[b])!r}")
    rng = np.random.default_rng(seed)
    zh = [t for t in texts if tokens(t)[1] and len(t) >= 100]
    en = [t for t in texts if not tokens(t)[1] and len(t.split()) >= 60]
    rows, planted, g = [], [], 0
    for kinds, pool in ((EDITS_EN, en), (EDITS_ZH, zh)):
        for kind in kinds:
            for orig in rng.choice(pool, min(per_kind, len(pool)), replace=False):
                rows.append((f"p{g:05d}-b", edit(str(orig), kind, rng)))
                planted.append((docs["id"][texts.index(orig)], f"p{g:05d}-b", kind))
                g += 1
    docs2 = pd.concat([docs, pd.DataFrame(rows, columns=["id", "text"])], ignore_index=True)
    planted = pd.DataFrame(planted, columns=["a", "b", "kind"])
    text2 = dict(zip(docs2["id"], docs2["text"]))
    planted["jaccard"] = exact_jaccard([text2[a] for a in planted["a"]], [text2[b] for b in planted["b"]])
    r = evaluate(docs2, planted, cfg, cpus)
    # a pair is false unless it joins copies of one original, or of originals already grouped on
    # the unedited corpus
    group = dict(zip(dups["id"], dups["duplicate_of"]))
    origin = dict(zip(planted["b"], planted["a"]))
    label = lambda i: group.get(origin.get(i, i), origin.get(i, i))  # noqa: E731
    false = [(a, b) for a, b in r["not_planted"] if label(a) != label(b)]
    planted = planted.assign(found=r["found"])
    table = planted.groupby("kind", sort=False).agg(
        pairs=("found", "size"), mean_jaccard_5gram=("jaccard", "mean"), recall=("found", "mean")
    )
    print(f"\nwith {len(planted)} edited copies of real documents planted:")
    print(table.round(3).to_string())
    print(
        f"planted recall {r['planted_r']:.3f}; predicted pairs {r['predicted']}, of them false (neither a "
        f"planted pair nor joining copies of documents grouped on the unedited corpus): {len(false)}"
    )
    for a, b in false:
        print(f"  false: J {true_jaccard(text2[a], text2[b], cfg.ngram, cfg.cjk_ngram):.2f}  {a} {b}")


# ----------------------------------------------------------------------------- datasketch baseline
def datasketch_dedup(texts: list[str], cfg: NearDedupConfig) -> tuple[int, float]:
    """MinHashLSH in one process: shingle, sign, insert, query, verify, union-find."""
    from datasketch import MinHash, MinHashLSH

    t = time.time()
    lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm, params=(cfg.bands, cfg.rows))
    sigs = []
    for i, text in enumerate(texts):
        toks, cjk = tokens(text)
        n = cfg.cjk_ngram if cjk else cfg.ngram
        shingles = {" ".join(toks[j : j + n]).encode() for j in range(max(1, len(toks) - n + 1))}
        m = MinHash(num_perm=cfg.num_perm, seed=1)
        m.update_batch(list(shingles))
        lsh.insert(i, m)
        sigs.append(m)
    parent = list(range(len(texts)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, m in enumerate(sigs):
        for j in lsh.query(m):
            if j > i and m.jaccard(sigs[j]) >= cfg.threshold:
                parent[find(j)] = find(i)
    dups = sum(find(i) != i for i in range(len(texts)))
    return dups, time.time() - t


class PeakRSS:
    """Peak summed RSS of this process and every Ray worker process, sampled every 0.2 s."""

    def __init__(self) -> None:
        import psutil

        self.psutil, self.peak, self._stop = psutil, 0, threading.Event()

    def _total(self) -> int:
        total = 0
        for p in self.psutil.process_iter(["cmdline", "memory_info"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if p.pid == os.getpid() or "ray::" in cmd or "default_worker.py" in cmd:
                total += p.info["memory_info"].rss if p.info["memory_info"] else 0
        return total

    def __enter__(self):
        self.base = self._total()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, self._total())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.thread.join()


def speed(n_docs: int, cpus: int, cfg: NearDedupConfig) -> dict:
    from tailorlm.data.dedup import exact_duplicates

    rng = np.random.default_rng(1)
    texts = make_docs(rng, n_docs)
    for i in range(0, n_docs, 50):  # 2% planted near duplicates so the edge path does real work
        texts[i + 1] = edit(texts[i], "substitute_2pct", rng)
    df = pd.DataFrame({"id": [f"d{i:07d}" for i in range(n_docs)], "text": texts})
    mb = df["text"].str.len().sum() / 1e6

    with PeakRSS() as mem:
        ours_dups, ours_s = ours(df, cfg, cpus)
    ds_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    base_dups, base_s = datasketch_dedup(texts, cfg)
    ds_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - ds_peak

    import xxhash

    t = time.time()
    # every 20th text twice: 5% exact duplicates
    exact_df = df.assign(text=[texts[i - i % 20 if i % 20 == 1 else i] for i in range(n_docs)])
    ds = to_dataset(exact_df, cpus)
    hashed = ds.map_batches(
        lambda b: b.assign(text_hash=[xxhash.xxh3_128_hexdigest(t.encode()) for t in b["text"]], priority=0),
        batch_format="pandas",
    )
    exact = exact_duplicates(hashed, cpus)
    exact_s = time.time() - t

    print(
        f"\n== near-dup speed: {n_docs} docs ({mb:.1f} MB), {cpus} CPUs, num_perm {cfg.num_perm}, "
        f"bands {cfg.bands} x rows {cfg.rows}, threshold {cfg.threshold}, verify {cfg.verify}"
    )
    print(
        f"ours (Ray Data, {cpus} CPUs):   {ours_s:7.1f}s  {n_docs / ours_s:8.0f} docs/s  dropped {len(ours_dups)}  "
        f"peak RSS (driver + Ray workers) {(mem.peak - mem.base) / 2**20:.0f} MiB over baseline"
    )
    print(
        f"datasketch MinHashLSH (1 proc): {base_s:7.1f}s  {n_docs / base_s:8.0f} docs/s  dropped {base_dups}  "
        f"peak RSS growth {ds_peak:.0f} MiB"
    )
    print(f"speed ratio ours / datasketch: {base_s / ours_s:.2f}x")
    print(f"exact dedup: {exact_s:.1f}s, {mb / exact_s:.1f} MB/s, {len(exact)} exact duplicates dropped")
    return {"ours_s": ours_s, "datasketch_s": base_s, "ratio": base_s / ours_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", nargs="?", choices=["quality", "speed", "real", "all"], default="all")
    ap.add_argument("--docs", type=int, default=100_000, help="speed: corpus size")
    ap.add_argument("--quality-docs", type=int, default=10_000, help="quality: planted corpus size")
    ap.add_argument("--seed", type=int, default=0, help="quality: planted corpus seed")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument(
        "--sweep",
        nargs="*",
        choices=list(SWEEP),
        help="quality: evaluate these configurations (all when none is named) on one corpus, one line each",
    )
    ap.add_argument("--paths", nargs="+", default=[], help="real: .jsonl (text), .json (alpaca) or .txt files")
    for name, kind in (("threshold", float), ("ngram", int), ("cjk_ngram", int), ("bands", int), ("rows", int)):
        ap.add_argument(f"--{name.replace('_', '-')}", type=kind, help=f"data.dedup.near.{name} (default: the default)")
    ap.add_argument("--verify", choices=["exact", "estimated"], help="data.dedup.near.verify (default: the default)")
    args = ap.parse_args()
    keys = ("threshold", "ngram", "cjk_ngram", "bands", "rows", "verify")
    cfg = NearDedupConfig(**{k: getattr(args, k) for k in keys if getattr(args, k) is not None})
    if args.which == "real" and not args.paths:
        ap.error("real needs --paths")
    import ray

    from tailorlm.cluster import LOCAL_SYSTEM_CONFIG

    # the embedded Ray's settings (as `tailorlm data` gets them), without the dashboard's CPU noise
    ray.init(
        address="local",
        num_cpus=args.cpus,
        include_dashboard=False,
        log_to_driver=False,
        _system_config=LOCAL_SYSTEM_CONFIG,
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    if args.which in ("quality", "all"):
        if args.sweep is not None:
            sweep(args.quality_docs, args.cpus, args.sweep or list(SWEEP), args.seed)
        else:
            quality(args.quality_docs, args.cpus, cfg, args.seed)
    if args.which == "real":
        real(args.paths, args.cpus, cfg, seed=args.seed)
    if args.which in ("speed", "all"):
        speed(args.docs, args.cpus, cfg)
    ray.shutdown()


if __name__ == "__main__":
    main()
