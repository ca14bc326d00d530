"""Dedup benchmarks: near-duplicate quality by edit kind, and speed against datasketch.

    python -m tailorlm.bench.dedup quality            # planted near-duplicates, P/R/F1 by edit kind
    python -m tailorlm.bench.dedup speed --docs 100000 --cpus 2
    python -m tailorlm.bench.dedup                    # both, default sizes
    python -m tailorlm.bench.dedup quality --verify estimated   # MinHash estimate only

Quality: a synthetic corpus (English-like words with a Zipf distribution, and Chinese characters)
where each planted group is an original plus one edited copy. A pair counts as a true duplicate
when its exact shingle Jaccard is >= 0.8; precision counts every predicted pair, planted or not.
Speed: our Ray Data path (signatures -> LSH buckets -> verified edges -> components) on N CPUs
against datasketch's MinHashLSH in one process with the same num_perm, bands, rows and threshold,
both end to end from in-memory texts, shingling included. Prints the ratio.
"""

from __future__ import annotations

import argparse
import itertools
import os
import resource
import threading
import time

import numpy as np
import pandas as pd

from tailorlm.config import NearDedupConfig
from tailorlm.bench.corpus import EDITS_EN, EDITS_ZH, edit, make_docs, make_zh_docs
from tailorlm.data.minhash import tokens, true_jaccard

def quality_corpus(n_background: int, groups_per_kind: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    kinds = EDITS_EN + EDITS_ZH
    n_en = groups_per_kind * len(EDITS_EN)
    n_zh = groups_per_kind * len(EDITS_ZH)
    en = make_docs(rng, n_background + n_en)
    zh = make_zh_docs(rng, n_zh + n_background // 10)
    rows, planted = [], []
    originals = en[:n_en] + zh[:n_zh]
    for g, (orig, kind) in enumerate(zip(originals, [k for k in kinds for _ in range(groups_per_kind)])):
        a, b = f"g{g:05d}-a", f"g{g:05d}-b"
        copy = edit(orig, kind, rng)
        rows += [(a, orig), (b, copy)]
        planted.append((a, b, kind, true_jaccard(orig, copy)))
    rows += [(f"bg{i:06d}", t) for i, t in enumerate(en[n_en:] + zh[n_zh:])]
    return pd.DataFrame(rows, columns=["id", "text"]), pd.DataFrame(planted, columns=["a", "b", "kind", "jaccard"])


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


def quality(n_background: int, groups_per_kind: int, cpus: int, verify: str) -> pd.DataFrame:
    cfg = NearDedupConfig(verify=verify)
    df, planted = quality_corpus(n_background, groups_per_kind)
    dups, secs = ours(df, cfg, cpus)
    pred = predicted_pairs(dups)
    planted["predicted"] = [(a, b) in pred for a, b in zip(planted["a"], planted["b"])]
    planted["true_dup"] = planted["jaccard"] >= 0.8
    rows = []
    for kind, g in planted.groupby("kind", sort=False):
        tp = int((g.predicted & g.true_dup).sum())
        rows.append(
            {
                "edit": kind,
                "pairs": len(g),
                "mean_jaccard": round(g.jaccard.mean(), 3),
                "true_dups": int(g.true_dup.sum()),
                "predicted": int(g.predicted.sum()),
                "tp": tp,
            }
        )
    table = pd.DataFrame(rows)
    table["precision"] = (table.tp / table.predicted.where(table.predicted > 0)).round(3)
    table["recall"] = (table.tp / table.true_dups.where(table.true_dups > 0)).round(3)
    planted_set = set(zip(planted["a"], planted["b"]))
    spurious = len(pred - planted_set)
    tp = int((planted.predicted & planted.true_dup).sum())
    precision = tp / max(1, len(pred))
    recall = tp / max(1, int(planted.true_dup.sum()))
    f1 = 2 * precision * recall / max(1e-9, precision + recall)
    print(
        f"\n== near-dup quality: {len(df)} docs, {len(planted)} planted pairs, threshold {cfg.threshold}, "
        f"num_perm {cfg.num_perm}, bands {cfg.bands} x rows {cfg.rows}, verify {cfg.verify} ({secs:.1f}s)"
    )
    print(table.to_string(index=False))
    print(
        f"overall on pairs with true Jaccard >= 0.8: precision {precision:.3f}  recall {recall:.3f}  F1 {f1:.3f}"
        f"  (predicted pairs {len(pred)}, of them not planted: {spurious})"
    )
    return table


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


def speed(n_docs: int, cpus: int, verify: str) -> dict:

    from tailorlm.data.dedup import exact_duplicates

    cfg = NearDedupConfig(verify=verify)
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
    ap.add_argument("which", nargs="?", choices=["quality", "speed", "all"], default="all")
    ap.add_argument("--docs", type=int, default=100_000, help="speed corpus size")
    ap.add_argument("--background", type=int, default=5000, help="quality: unrelated documents")
    ap.add_argument("--groups", type=int, default=100, help="quality: planted pairs per edit kind")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument(
        "--verify",
        choices=["exact", "estimated"],
        default=NearDedupConfig().verify,
        help="how candidate pairs are checked (data.dedup.near.verify)",
    )
    args = ap.parse_args()
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
    if args.which in ("quality", "all"):
        quality(args.background, args.groups, args.cpus, args.verify)
    if args.which in ("speed", "all"):
        speed(args.docs, args.cpus, args.verify)
    ray.shutdown()


if __name__ == "__main__":
    main()
