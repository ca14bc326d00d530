"""Exact and MinHash near-duplicate detection on Ray Data, distributed and deterministic.

Both return a small table of the rows to drop, `(key, duplicate_of, reason)`, which the stage
applies to the full dataset. Nothing on the driver grows with the corpus beyond the duplicates
and the verified candidate edge list:

exact: hash-partition (text_hash, priority, id) by text_hash; inside each partition the first row of
       each group in (priority, id) order is kept.
near:  band keys per row -> hash-partition by band key -> candidate pairs inside each bucket ->
       attach both signatures -> pairs whose estimated Jaccard reaches the threshold ->
       (verify: exact) pairs whose exact shingle Jaccard reaches it -> connected components
       (scipy) on the driver -> one representative each.
       Attaching signatures is a broadcast join while the candidate pairs are few (one
       filtering pass over the signatures fetches only the rows the pairs name); beyond
       BROADCAST_PAIRS it is two distributed hash joins of the pairs with only those rows.
       The exact check runs as Ray Data tasks over the pairs that pass the estimate with a margin
       (`estimate_floor`: 4 standard deviations of the estimate, at least EXACT_MARGIN), so only
       candidates' texts are shingled again.

Ids must be unique (the stage passes `dedup_id`s: the input may repeat ids). The
representative of a group is its smallest (priority, id): priority 0 for eval rows when
decontamination is on (so a train row that duplicates an eval row is dropped as
`eval_contamination`, never the eval row), else 0 for all. Same input, same representative.

Keyed `repartition` followed by `map_batches(batch_size=None)` is used instead of
`groupby().map_groups()` / `aggregate()` because it is 10x faster here (one vectorized pandas
pass per partition instead of one Python call per group); `_one_block_per_partition` checks the
property that makes it correct (a partition is never split across blocks).
"""

from __future__ import annotations

import itertools
import logging
import math

import numpy as np
import pandas as pd

from tailorlm.config import NearDedupConfig
from tailorlm.data.minhash import band_keys, estimated_jaccard, exact_jaccard, signatures

log = logging.getLogger(__name__)
DUP_COLUMNS = ["id", "duplicate_of", "reason"]
EDGE_COLUMNS = ["id_a", "priority_a", "id_b", "priority_b", "jaccard"]
MAX_PAIRS_BUCKET = 64  # buckets larger than this emit a star around the smallest member
# Up to this many candidate pairs the driver verifies them (their signatures) and holds ...
BROADCAST_PAIRS = 200_000  # ... the rows they name: <= 400k rows (signature and text), ~0.7 GB
# The hash joins of more pairs: each side holds only the rows some pair names (a broadcast set of
# keys, 16 bytes a pair), and there is a partition per JOIN_PAIRS_PER_PARTITION pairs. With
# partitions sized by rows instead (4 on 2 CPUs) a 1M-document run had ~1M pairs joined to their
# rows' signatures and texts in 4 tasks, 6-8 GB each; at 100k pairs a partition they still took
# 3-5 GB (the joined pairs as pandas, both texts and signatures: ~10x their bytes on disk).
JOIN_PAIRS_PER_PARTITION = 25_000
# Up to this many live rows dedup runs in the driver process on one pandas frame (the same
# functions, one partition): each distributed shuffle costs about a second of Ray Data
# scheduling here, five of them were most of a small corpus's wall time, and 20k rows of
# signatures and texts are ~50 MB. Larger corpora take the distributed path.
LOCAL_ROWS = 20_000
EXACT_MARGIN = 0.1  # verify: exact looks again at pairs whose estimate is within this of the threshold
EXACT_SIGMAS = 4.0  # ... or within this many standard deviations of the estimate, if that is wider
VERIFY_PAIRS_PER_TASK = 20_000


def _empty_dups() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series([], dtype=object) for c in DUP_COLUMNS})


def _empty_edges() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "id_a": pd.Series([], dtype=object),
            "priority_a": pd.Series([], dtype="int64"),
            "id_b": pd.Series([], dtype=object),
            "priority_b": pd.Series([], dtype="int64"),
            "jaccard": pd.Series([], dtype="float64"),
        }
    )


def _empty_pairs() -> pd.DataFrame:
    return pd.DataFrame({"a": pd.Series([], dtype="uint64"), "b": pd.Series([], dtype="uint64")})


def _to_pandas(ds, empty: pd.DataFrame) -> pd.DataFrame:
    """`ds.to_pandas()`, or `empty` when it has no rows: Ray Data gives a dataset without rows a
    frame without columns (no pairs, no edges, every row filtered out), which the next step
    would index by column name."""
    df = ds.to_pandas()
    return df if len(df) else empty


def num_partitions(rows: int, cpus: int, rows_per_partition: int = 2_000_000) -> int:
    return max(2 * cpus, math.ceil(rows / rows_per_partition))


def _partition(ds, keys: list[str], parts: int):
    out = ds.repartition(parts, keys=keys).materialize()
    if out.num_blocks() > parts:
        raise RuntimeError(
            f"dedup: a hash partition was split into several blocks ({out.num_blocks()} blocks "
            f"for {parts} partitions); raise the partition count"
        )
    return out


def _drop_reason(priority, rep_priority, default: str) -> np.ndarray:
    """A train row whose representative is an eval row is contamination, not a plain duplicate."""
    return np.where(np.asarray(priority) > np.asarray(rep_priority), "eval_contamination", default)


def add_signatures(
    batch: pd.DataFrame, cfg: NearDedupConfig, live: list[bool], seed: int, ids: pd.Series | None = None
) -> pd.DataFrame:
    """`key` (uint64 of the id, or of `ids`: what dedup will see as the id) and `sig` (MinHash
    bytes) columns; rows not live get an empty signature."""
    texts = [t if ok and isinstance(t, str) else "" for t, ok in zip(batch["text"], live)]
    ids = batch["id"] if ids is None else ids
    batch["key"] = pd.util.hash_array(ids.astype(str).to_numpy(dtype=object))
    sig = (
        signatures(texts, cfg.num_perm, cfg.ngram, cfg.cjk_ngram, seed=seed)
        if cfg.enabled
        else np.zeros((len(batch), 1), dtype=np.uint32)
    )
    batch["sig"] = [row.tobytes() for row in sig]
    return batch


def near_duplicates(live, cfg: NearDedupConfig, cpus: int) -> tuple[pd.DataFrame, int]:
    """Rows to drop as near duplicates, and the number of verified edges."""
    edges = candidate_edges(live, cfg, cpus)
    return components(edges), len(edges)


# ----------------------------------------------------------------------------- exact
def _exact_groups(batch: pd.DataFrame) -> pd.DataFrame:
    if batch.empty:
        return _empty_dups()
    b = batch.sort_values(["text_hash", "priority", "id"], kind="stable")
    first = ~b["text_hash"].duplicated(keep="first")
    rep_id = b["id"].where(first).ffill()
    rep_priority = b["priority"].where(first).ffill()
    d = b[~first]
    return pd.DataFrame(
        {
            "id": d["id"],
            "duplicate_of": rep_id[~first],
            "reason": _drop_reason(d["priority"], rep_priority[~first], "exact_duplicate"),
        }
    )


def exact_duplicates(live, cpus: int) -> pd.DataFrame:
    small = live.select_columns(["text_hash", "priority", "id"])
    parts = _partition(small, ["text_hash"], num_partitions(small.count(), cpus))
    return _to_pandas(parts.map_batches(_exact_groups, batch_size=None, batch_format="pandas"), _empty_dups())


# ----------------------------------------------------------------------------- near
def _band_rows(batch: pd.DataFrame, bands: int, rows: int, num_perm: int) -> pd.DataFrame:
    if batch.empty:  # an empty block may come without columns
        return pd.DataFrame({"bucket": pd.Series([], dtype="uint64"), "key": pd.Series([], dtype="uint64")})
    sig = np.frombuffer(b"".join(batch["sig"]), dtype=np.uint32).reshape(len(batch), num_perm)
    has = ~(sig == np.uint32(0xFFFFFFFF)).all(axis=1)  # docs without tokens join no bucket
    keys = band_keys(sig[has], bands, rows)
    return pd.DataFrame({"bucket": keys.ravel(), "key": np.repeat(batch["key"].to_numpy(np.uint64)[has], bands)})


def _bucket_pairs(batch: pd.DataFrame) -> pd.DataFrame:
    """Candidate pairs (a < b) from every bucket with two or more members."""
    if batch.empty:
        return _empty_pairs()
    b = batch[batch["bucket"].duplicated(keep=False)].sort_values(["bucket", "key"], kind="stable")
    if b.empty:
        return _empty_pairs()
    bucket, key = b["bucket"].to_numpy(), b["key"].to_numpy(np.uint64)
    starts = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]])
    sizes = np.diff(np.r_[starts, len(bucket)])
    pairs_a, pairs_b = [key[starts[sizes == 2]]], [key[starts[sizes == 2] + 1]]  # the common case, vectorized
    for s, n in zip(starts[sizes > 2], sizes[sizes > 2]):
        members = key[s : s + n]
        if n <= MAX_PAIRS_BUCKET:
            combos = np.array(list(itertools.combinations(range(n), 2)))
            pairs_a.append(members[combos[:, 0]])
            pairs_b.append(members[combos[:, 1]])
        else:
            pairs_a.append(np.repeat(members[0], n - 1))
            pairs_b.append(members[1:])
    a, bb = np.concatenate(pairs_a), np.concatenate(pairs_b)
    pairs = pd.DataFrame({"a": np.minimum(a, bb), "b": np.maximum(a, bb)})
    return pairs[pairs["a"] != pairs["b"]].drop_duplicates()


def _verify(batch: pd.DataFrame, num_perm: int, threshold: float) -> pd.DataFrame:
    """Pairs whose estimated Jaccard reaches the threshold; texts ride along for an exact check."""
    if batch.empty:  # possibly without columns; the exact check needs none of them then
        return _empty_edges()
    keep = ["id_a", "priority_a", "id_b", "priority_b"] + [c for c in ("text_a", "text_b") if c in batch]
    sa = np.frombuffer(b"".join(batch["sig_a"]), dtype=np.uint32).reshape(len(batch), num_perm)
    sb = np.frombuffer(b"".join(batch["sig_b"]), dtype=np.uint32).reshape(len(batch), num_perm)
    j = estimated_jaccard(sa, sb)
    return batch.loc[j >= threshold, keep].assign(jaccard=j[j >= threshold])


def _verify_exact(batch: pd.DataFrame, threshold: float, ngram: int, cjk_ngram: int) -> pd.DataFrame:
    if batch.empty:
        return _empty_edges()
    j = exact_jaccard(batch["text_a"].tolist(), batch["text_b"].tolist(), ngram, cjk_ngram)
    return batch.loc[j >= threshold, ["id_a", "priority_a", "id_b", "priority_b"]].assign(jaccard=j[j >= threshold])


def estimate_floor(threshold: float, num_perm: int) -> float:
    """The smallest MinHash estimate `verify: exact` still checks exactly: a pair at the threshold
    estimates below it about once in 30k (4 standard deviations of the estimate, sqrt(J(1-J)/num_perm):
    0.18 at J 0.5 with 128 permutations), and never less than EXACT_MARGIN below the threshold."""
    return threshold - max(EXACT_MARGIN, EXACT_SIGMAS * math.sqrt(threshold * (1 - threshold) / num_perm))


def _keys_named(pair_frames) -> np.ndarray:
    """The distinct keys that frames of candidate pairs (a, b) name."""
    return np.unique(np.concatenate([f[c].to_numpy(np.uint64) for f in pair_frames for c in "ab"]))


def _rows_with_keys(batch: pd.DataFrame, keys: np.ndarray) -> pd.DataFrame:
    return batch[np.isin(batch["key"].to_numpy(np.uint64), keys)]


def _attach(pairs: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    """Pairs (a, b) of keys -> both rows' columns side by side (`<column>_a`, `<column>_b`)."""
    rows = rows.drop_duplicates("key").set_index("key")  # a row read twice by a retried task counts once
    a, b = rows.loc[pairs["a"].to_numpy(np.uint64)], rows.loc[pairs["b"].to_numpy(np.uint64)]
    return pd.DataFrame(
        {f"{col}_{side}": df[col].to_numpy() for side, df in (("a", a), ("b", b)) for col in rows.columns}
    )


def _verify_args(cfg: NearDedupConfig) -> tuple[dict, dict]:
    exact = cfg.verify == "exact"
    verify = dict(
        num_perm=cfg.num_perm, threshold=estimate_floor(cfg.threshold, cfg.num_perm) if exact else cfg.threshold
    )
    return verify, dict(threshold=cfg.threshold, ngram=cfg.ngram, cjk_ngram=cfg.cjk_ngram)


# ----------------------------------------------------------------------------- small corpora
def exact_duplicates_local(live: pd.DataFrame) -> pd.DataFrame:
    """`exact_duplicates` of a frame in this process: the same groups, no shuffle."""
    return _exact_groups(live[["text_hash", "priority", "id"]]) if len(live) else _empty_dups()


def near_duplicates_local(live: pd.DataFrame, cfg: NearDedupConfig) -> tuple[pd.DataFrame, int]:
    """`near_duplicates` of a frame in this process: the same steps on one partition holding
    every bucket, so the same edges and groups (a property test compares the two paths)."""
    if live.empty:
        return _empty_dups(), 0
    verify, exact_args = _verify_args(cfg)
    pairs = _bucket_pairs(_band_rows(live, cfg.bands, cfg.rows, cfg.num_perm))
    if pairs.empty:
        return _empty_dups(), 0
    cols = ["key", "sig", "id", "priority"] + (["text"] if cfg.verify == "exact" else [])
    edges = _verify(_attach(pairs, live[cols]), **verify)
    if cfg.verify == "exact" and not edges.empty:
        edges = _verify_exact(edges, **exact_args)
    edges = edges.reset_index(drop=True)
    return components(edges), len(edges)


def candidate_edges(live, cfg: NearDedupConfig, cpus: int, broadcast_pairs: int = BROADCAST_PAIRS) -> pd.DataFrame:
    """Distributed: band rows -> buckets -> candidate pairs, verified against the Jaccard threshold."""
    import ray

    exact = cfg.verify == "exact"
    sigs = live.select_columns(["key", "sig", "id", "priority"] + (["text"] if exact else []))
    n = sigs.count()
    bands = sigs.map_batches(
        _band_rows, fn_kwargs=dict(bands=cfg.bands, rows=cfg.rows, num_perm=cfg.num_perm), batch_format="pandas"
    )
    buckets = _partition(bands, ["bucket"], num_partitions(n * cfg.bands, cpus))
    pairs = buckets.map_batches(_bucket_pairs, batch_size=None, batch_format="pandas").materialize()
    verify, exact_args = _verify_args(cfg)
    n_pairs = pairs.count()
    if n_pairs == 0:  # a corpus without near duplicates: nothing to verify
        return _empty_edges()
    log.info("near dedup: %d rows, %d candidate pairs", n, n_pairs)
    if n_pairs <= broadcast_pairs:
        p = pairs.to_pandas().drop_duplicates()
        need = _keys_named([p])
        rows = sigs.map_batches(_rows_with_keys, fn_kwargs={"keys": need}, batch_format="pandas").to_pandas()
        edges = _verify(_attach(p, rows), **verify).reset_index(drop=True)
        if not exact or edges.empty:
            return edges
        step = VERIFY_PAIRS_PER_TASK
        return _to_pandas(
            ray.data.from_pandas([edges.iloc[i : i + step] for i in range(0, len(edges), step)]).map_batches(
                _verify_exact, fn_kwargs=exact_args, batch_size=None, batch_format="pandas"
            ),
            _empty_edges(),
        ).reset_index(drop=True)
    parts = max(num_partitions(n, cpus), math.ceil(n_pairs / JOIN_PAIRS_PER_PARTITION))
    # the keys some pair names, 8 bytes each on the driver (n_pairs > 0 here)
    need = _keys_named(pairs.iter_batches(batch_format="pandas", batch_size=None))
    named = sigs.map_batches(_rows_with_keys, fn_kwargs={"keys": need}, batch_format="pandas")
    side_a = named.rename_columns({c: f"{c}_a" if c != "key" else "a" for c in sigs.columns()})
    side_b = named.rename_columns({c: f"{c}_b" if c != "key" else "b" for c in sigs.columns()})
    joined = pairs.join(side_a, "inner", parts, on=("a",)).join(side_b, "inner", parts, on=("b",))
    edges = joined.map_batches(_verify, fn_kwargs=verify, batch_format="pandas")
    if exact:
        edges = edges.map_batches(_verify_exact, fn_kwargs=exact_args, batch_format="pandas")
    return _to_pandas(edges, _empty_edges())


def components(edges: pd.DataFrame) -> pd.DataFrame:
    """Verified edges -> one row per non-representative member: (id, duplicate_of, reason).

    Runs on the driver: its memory is that of the verified edge list, not of the corpus."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if edges.empty:
        return _empty_dups()
    nodes = pd.concat(
        [
            edges[["id_a", "priority_a"]].set_axis(["id", "priority"], axis=1),
            edges[["id_b", "priority_b"]].set_axis(["id", "priority"], axis=1),
        ]
    ).drop_duplicates("id")
    nodes = nodes.sort_values(["priority", "id"], kind="stable").reset_index(drop=True)
    index = pd.Series(np.arange(len(nodes)), index=nodes["id"])
    a, b = index[edges["id_a"]].to_numpy(), index[edges["id_b"]].to_numpy()
    graph = coo_matrix((np.ones(len(a)), (a, b)), shape=(len(nodes), len(nodes)))
    _, label = connected_components(graph, directed=False)
    nodes["label"] = label
    # nodes are sorted by (priority, id), so the first node of each component is its representative
    first = ~nodes["label"].duplicated(keep="first")
    rep = nodes[first].set_index("label")
    dup = nodes[~first]
    rep_of = rep.loc[dup["label"]]
    return pd.DataFrame(
        {
            "id": dup["id"].to_numpy(),
            "duplicate_of": rep_of["id"].to_numpy(),
            "reason": _drop_reason(dup["priority"], rep_of["priority"], "near_duplicate"),
        }
    )
