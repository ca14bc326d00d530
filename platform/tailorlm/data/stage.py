"""The data stage: read -> normalize -> filter -> PII -> split -> exact dedup -> near dedup -> write.

    tailorlm data jobs/configs/tiny_cpu.yaml
    tailorlm data --input 'raw/*.jsonl.gz' --output ./cleaned

Outputs in the stage folder: `kept/` (Parquet, with a `split` column: train or eval) and
`dropped/` (Parquet, each row with `reason` and, for duplicates, `duplicate_of`), `stats.json`.
Every input row appears exactly once across kept/ and dropped/; the stage checks it. `row`
(`<file>#<position>`) says where each came from. `id` is the record's own (`row` when it has
none) and may repeat as the input's ids do: dedup tells rows apart by position, so of two lines
with the same id and text one is kept, and `duplicate_of` names the kept row by its id.

Any readable input completes, including one with no rows (an empty file, blank lines only) and one
whose every row a filter drops: kept/ and dropped/ then hold one empty Parquet file with the output
schema, stats.json counts 0, and `_COMPLETE.json` is written. Only input that cannot be read at all
(a missing path, an unsupported format, a corrupt gzip) is an error.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from fsspec.core import url_to_fs

from tailorlm.config import DataConfig, PipelineConfig, SourceConfig
from tailorlm.data import dedup
from tailorlm.data.filters import ModelFilters, any_model_filter, length_batch, wants_tokens
from tailorlm.data.normalize import normalize_batch
from tailorlm.data.pii import pii_batch
from tailorlm.data.read import COLUMNS, plan_reads, read_in_process, read_sources, source_error, write_demo
from tailorlm.runs import RunDir, StageDir

log = logging.getLogger(__name__)

OUT_COLUMNS = [
    "id",
    "split",
    "kind",
    "text",
    "messages",
    "language",
    "pii",
    "reason",
    "duplicate_of",
    "source",
    "row",
    "raw_text",
    "text_hash",
]
# perplexity: the perplexity filter's score (null when that filter is off or the row was not scored)
OUT_SCHEMA = pa.schema([(c, pa.string()) for c in OUT_COLUMNS] + [("perplexity", pa.float64())])
STEP_OF = {
    "malformed_json": "read",
    "invalid_utf8": "read",
    "malformed_record": "read",
    "missing_text": "read",
    "empty": "normalize",
    "exact_duplicate": "dedup_exact",
    "near_duplicate": "dedup_near",
    "eval_contamination": "decontaminate",
}


def step_of(reason: str) -> str:
    return STEP_OF.get(reason, "filter")


SEP = "\x00"


def dedup_id(ids: pd.Series, rows: pd.Series) -> pd.Series:
    """The id dedup sees: the record's id, NUL, its position (`row`). Unique where the input repeats
    ids (two lines with id "a" and the same text must lose one, not both), and it sorts as the id
    does (NUL sorts first), so a group's representative is still its smallest id, ties broken by
    position."""
    return ids.astype(str) + SEP + rows.astype(str)


def user_id(uid: str) -> str:
    return uid.rpartition(SEP)[0]  # positions hold no NUL; ids may


# ----------------------------------------------------------------------------- batch steps
def prepare_batch(batch: pd.DataFrame, data_cfg: dict) -> pd.DataFrame:
    """Normalize text and apply the character-length filter (cheap, stateless)."""
    cfg = DataConfig.model_validate(data_cfg)
    for c in COLUMNS:
        if c not in batch:
            batch[c] = None
    batch = batch[COLUMNS].astype(object)
    batch = normalize_batch(batch, enabled=cfg.normalize)
    return strings_or_none(length_batch(batch, cfg.filters.model_dump()))


def finish_batch(batch: pd.DataFrame, data_cfg: dict, seed: int) -> pd.DataFrame:
    """PII redaction, then what dedup and the split need: split, keep priority, text hash, MinHash signature."""
    import xxhash

    cfg = DataConfig.model_validate(data_cfg)
    if cfg.pii.enabled:
        batch = pii_batch(batch, list(cfg.pii.kinds))
    # deterministic split from the id alone: the same row lands in the same split on every run
    h = pd.util.hash_array(("%d:" % seed + split_key(batch)).to_numpy(dtype=object)).astype(np.float64) / 2.0**64
    batch["split"] = np.where(h < cfg.eval_fraction, "eval", "train")
    batch["priority"] = np.where((batch["split"] == "train") & cfg.decontaminate, 1, 0).astype(np.int64)
    live = batch["reason"].isna().tolist()
    texts = [t if ok and isinstance(t, str) else "" for t, ok in zip(batch["text"], live)]
    batch["text_hash"] = [xxhash.xxh3_128_hexdigest(t.encode()) if ok else None for t, ok in zip(texts, live)]
    batch = dedup.add_signatures(batch, cfg.dedup.near, live, seed=seed + 1, ids=dedup_id(batch["id"], batch["row"]))
    return strings_or_none(batch)


def split_key(batch: pd.DataFrame) -> pd.Series:
    """What the split hashes: the record's own id, or for a record without one (its id is its
    `row`, `<file>#<line>`) the file's name and line, not the folder: the same file in another
    run folder or storage (the demo's sources are written into each run) splits the same way."""
    ids, rows = batch["id"].astype(str), batch["row"].astype(str)
    return ids.where(ids != rows, rows.str.rsplit("/", n=1).str[-1])


STRING_COLUMNS = set(COLUMNS) | {"language", "split", "text_hash"}


def strings_or_none(batch: pd.DataFrame) -> pd.DataFrame:
    """Missing values as None, so Arrow sees string columns, not a mix of str and float NaN."""
    for c in STRING_COLUMNS & set(batch.columns):
        batch[c] = pd.Series(
            [v if isinstance(v, str) else None for v in batch[c].tolist()], index=batch.index, dtype=object
        )
    return batch


def _rows_where_reason(table: pa.Table, dropped: bool) -> pa.Table:
    import pyarrow.compute as pc

    if table.num_rows == 0:
        return OUT_SCHEMA.empty_table()
    null = pc.is_null(table["reason"])
    return table.filter(pc.invert(null) if dropped else null)


def _live(batch: pd.DataFrame) -> pd.DataFrame:
    """Rows still in the running, with the dedup id in place of the id."""
    if batch.empty:
        return batch
    batch = batch[batch["reason"].isna()].copy()
    batch["id"] = dedup_id(batch["id"], batch["row"])
    return batch


def _without(batch: pd.DataFrame, ids: set) -> pd.DataFrame:
    if batch.empty:
        return batch
    return batch[~batch["id"].isin(ids)]


def apply_duplicates(batch: pd.DataFrame, dups: pd.DataFrame) -> pa.Table:
    """Mark duplicate rows dropped (reason, duplicate_of) and cast to the output schema. dups are
    keyed by dedup id; duplicate_of names the representative by its record id."""
    if batch.empty:  # an empty block may come without columns
        return OUT_SCHEMA.empty_table()
    if len(dups):
        by_uid = dups.set_index("id")
        uid = dedup_id(batch["id"], batch["row"])
        found = uid.map(by_uid["reason"])
        hit = found.notna() & batch["reason"].isna()
        batch.loc[hit, "reason"] = found[hit]
        batch.loc[hit, "duplicate_of"] = uid[hit].map(by_uid["duplicate_of"]).map(user_id)
    if "language" not in batch:
        batch["language"] = None
    cols = {c: [v if isinstance(v, str) else None for v in batch[c].tolist()] for c in OUT_COLUMNS}
    ppl = batch["perplexity"].tolist() if "perplexity" in batch else [None] * len(batch)
    cols["perplexity"] = [None if pd.isna(v) else float(v) for v in ppl]  # NaN, NA, None -> null
    return pa.table(cols, schema=OUT_SCHEMA)


COUNT_COLUMNS = {
    "reason": object,
    "split": object,
    "rows": "int64",
    "chars": "int64",
    "pii": "int64",
    "pii_json": object,
}


def _empty_counts() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series([], dtype=t) for c, t in COUNT_COLUMNS.items()})


def count_batch(batch: pd.DataFrame) -> pd.DataFrame:
    if batch.empty:
        return _empty_counts()
    reason = batch["reason"].fillna("kept")
    pii = [sum(json.loads(p).values()) if isinstance(p, str) else 0 for p in batch["pii"]]
    return (
        pd.DataFrame(
            {
                "reason": reason,
                "split": batch["split"].fillna(""),
                "chars": batch["text"].fillna("").str.len(),
                "pii": pii,
                "pii_json": batch["pii"],
            }
        )
        .groupby(["reason", "split"], as_index=False)
        .agg(
            rows=("chars", "size"),
            chars=("chars", "sum"),
            pii=("pii", "sum"),
            pii_json=("pii_json", lambda s: json.dumps(_sum_pii(s))),
        )
    )


def _sum_pii(values) -> dict[str, int]:
    total: dict[str, int] = {}
    for v in values:
        if isinstance(v, str):
            for k, n in json.loads(v).items():
                total[k] = total.get(k, 0) + n
    return total


def write_block(batch: pd.DataFrame, dups: pd.DataFrame, kept_uri: str, dropped_uri: str) -> pd.DataFrame:
    """Apply the duplicates to one block, write its kept and dropped rows, return its counts.

    One pass over the annotated corpus writes both outputs and counts them (Ray Data's
    write_parquet writes one dataset per pass: two more passes, and a materialized copy of the
    whole corpus to feed them). A block's file is named by the rows it holds, so a task that Ray
    retries overwrites its own file instead of adding a second copy of its rows."""
    import pyarrow.parquet as pq
    import xxhash
    from fsspec.core import url_to_fs

    table = apply_duplicates(batch, dups)
    if table.num_rows:
        name = xxhash.xxh3_64_hexdigest("\n".join(table["row"].to_pylist()).encode()) + ".parquet"
        for uri, dropped in ((kept_uri, False), (dropped_uri, True)):
            part = _rows_where_reason(table, dropped)
            if part.num_rows:
                fs, path = url_to_fs(uri)
                with fs.open(f"{path.rstrip('/')}/{name}", "wb") as fh:
                    pq.write_table(part, fh)
    return count_batch(batch)  # apply_duplicates set the reasons on batch itself


def schema_file_if_empty(uri: str) -> None:
    """An output with no rows still gets one empty file with the output schema (readers of kept/
    need the schema, and an empty folder is indistinguishable from an unwritten one)."""
    import pyarrow.parquet as pq
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(uri)
    fs.makedirs(path, exist_ok=True)
    if any(p.endswith(".parquet") for p in fs.ls(path, detail=False)):
        return
    with fs.open(f"{path.rstrip('/')}/empty.parquet", "wb") as fh:
        pq.write_table(OUT_SCHEMA.empty_table(), fh)


# ----------------------------------------------------------------------------- stage
def resolve_sources(cfg: PipelineConfig, run_dir: RunDir) -> list[SourceConfig]:
    out = []
    for src in cfg.data.sources:
        if src.path == "demo":
            src = src.model_copy(update={"path": write_demo(run_dir.uri + "/_demo_sources")})
        elif src.path == "continual":  # the next slice from a served run (continual.py)
            from tailorlm.continual import build_slice

            src = src.model_copy(update={"path": build_slice(cfg, run_dir)[0]})
        out.append(src)
    return out


def in_process(plan: list[dict], data_cfg: DataConfig) -> bool:
    """Whether the planned reads are small enough to run here, without Ray Data: starting Ray and
    Ray Data's first pipeline cost ~15 s of a 20 s run on 100 documents (2 cores), more than the
    work itself up to several thousand documents. The steps are the same functions either way."""
    limit = data_cfg.in_process_max_mb
    return limit > 0 and sum(r["bytes"] for r in plan) <= limit * 1e6  # 0: Ray Data even for an empty file


class Annotate:
    """prepare -> model filters -> finish on one batch: every per-row step, in one place for both
    executors. With a model filter on, Ray Data runs it as an actor pool (the filters' models load
    once per actor), the read fused into it: one operator, so no second operator's tasks hold a CPU
    the pool needs."""

    def __init__(self, data_cfg: dict, seed: int, tokenizer: str | None, ppl_model: str | None) -> None:
        self.data_cfg, self.seed = data_cfg, seed
        dc = DataConfig.model_validate(data_cfg)
        self.filters = (
            ModelFilters(dc.filters.model_dump(), tokenizer, ppl_model)
            if any_model_filter(dc.filters, tokenizer)
            else None
        )

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        batch = prepare_batch(batch, self.data_cfg)
        if self.filters is not None and len(batch):
            parts = [batch.iloc[i : i + FILTER_BATCH].copy() for i in range(0, len(batch), FILTER_BATCH)]
            batch = pd.concat([self.filters(part) for part in parts])
        return finish_batch(batch, self.data_cfg, self.seed)


def annotate_task(batch: pd.DataFrame, data_cfg: dict, seed: int) -> pd.DataFrame:
    """Annotate as a plain Ray task, when no model filter is on (nothing to load per worker)."""
    return Annotate(data_cfg, seed, None, None)(batch)


# rows per model-filter call (bounds the perplexity model's batch). Not Ray Data's batch_size: the
# read is fused into the Annotate operator, whose input blocks are the planned reads (one row
# each), and a batch_size of 512 bundled every read of a 1M-document corpus into one task
FILTER_BATCH = 512


def annotate_in_process(plan: list[dict], dc: DataConfig, tokenizer, ppl_model, seed: int) -> pd.DataFrame:
    """The pipeline of annotate_ray in this process, on one frame."""
    frames = [f for f in read_in_process(plan) if len(f)]
    if not frames:
        return pd.DataFrame(columns=COLUMNS)
    rows = pd.concat(frames, ignore_index=True)
    return Annotate(dc.model_dump(), seed, tokenizer, ppl_model)(rows).reset_index(drop=True)


def annotate_ray(plan: list[dict], dc: DataConfig, tokenizer, ppl_model, seed: int, cpus: int):
    """read -> Annotate as a Ray Data pipeline, materialized (dedup and the write read it again)."""
    ds = read_sources(plan)
    if any_model_filter(dc.filters, tokenizer):
        ds = ds.map_batches(
            Annotate,
            fn_constructor_kwargs={
                "data_cfg": dc.model_dump(),
                "seed": seed,
                "tokenizer": tokenizer,
                "ppl_model": ppl_model,
            },
            # one actor per CPU from the start (the read runs inside it), no more than reads: each
            # actor loads the filters' models
            concurrency=max(1, min(cpus, len(plan))),
            batch_size=None,  # one planned read per call
            batch_format="pandas",
        )
    else:
        ds = ds.map_batches(
            annotate_task, fn_kwargs={"data_cfg": dc.model_dump(), "seed": seed}, batch_size=None, batch_format="pandas"
        )
    try:
        return ds.materialize()
    except Exception as exc:  # a file that cannot be read (corrupt gzip, bad JSON document) fails in a task
        cause = source_error(exc)
        if cause is None:
            raise
        raise cause from None


def run(cfg: PipelineConfig, run_dir: RunDir, sdir: StageDir) -> dict[str, Any]:
    from tailorlm.models import resolve_base

    dc = cfg.data
    timings: dict[str, float] = {}
    t0 = time.time()
    sources = resolve_sources(cfg, run_dir)
    plan = plan_reads(sources)
    here = in_process(plan, dc)
    cpus = 1
    if not here:
        from tailorlm.cluster import init_ray

        # tailorlm data leaves starting Ray to the stage (a small input never needs it; the CLI has
        # taken the API keys out of the environment already); init_ray comes before anything
        # imports ray: it keeps an embedded Ray on loopback only if it comes first
        cpus = int(init_ray().get("CPU", 1))
    log.info("data: %d reads, %s", len(plan), "in this process" if here else f"Ray Data on {cpus} CPUs")
    # the tokenizer and the perplexity model are resolved (a factory model built) only when a
    # filter that is switched on needs them
    tokenizer = (dc.tokenizer or resolve_base(cfg.model, cfg.run.storage)) if wants_tokens(dc.filters) else None
    ppl_model = (
        (dc.filters.perplexity_model or resolve_base(cfg.model, cfg.run.storage)) if dc.filters.max_perplexity else None
    )
    if here:
        annotated = annotate_in_process(plan, dc, tokenizer, ppl_model, cfg.run.seed)
        n_input = len(annotated)
    else:
        annotated = annotate_ray(plan, dc, tokenizer, ppl_model, cfg.run.seed, cpus)
        n_input = annotated.count()
    timings["read_filter"] = time.time() - t0

    t = time.time()
    needed = ["id", "row", "reason", "text_hash", "priority", "key", "sig"] + (
        ["text"] if dc.dedup.near.enabled else []
    )
    if here:
        live = None
        local = _live(annotated[needed]) if n_input else pd.DataFrame(columns=needed)
    else:
        live = annotated.select_columns(needed).map_batches(_live, batch_format="pandas").materialize()
        n_live = live.count()
        local = dedup._to_pandas(live, pd.DataFrame(columns=needed)) if n_live <= dedup.LOCAL_ROWS else None
    if not dc.dedup.exact:
        exact = dedup._empty_dups()
    else:
        exact = dedup.exact_duplicates_local(local) if local is not None else dedup.exact_duplicates(live, cpus)
    timings["dedup_exact"] = time.time() - t

    t = time.time()
    near = dedup._empty_dups()
    n_edges = 0
    if dc.dedup.near.enabled and local is not None:
        near, n_edges = dedup.near_duplicates_local(local[~local["id"].isin(set(exact["id"]))], dc.dedup.near)
    elif dc.dedup.near.enabled:
        survivors = live.map_batches(_without, fn_kwargs={"ids": set(exact["id"])}, batch_format="pandas")
        near, n_edges = dedup.near_duplicates(survivors, dc.dedup.near, cpus)
    timings["dedup_near"] = time.time() - t

    # an exact duplicate points at the row kept in its place, even when its exact twin was
    # itself dropped as a near duplicate; when that row is an eval row, the copy is contamination
    # (found by the property tests: it stayed `exact_duplicate` while pointing at an eval row)
    rep, why = dict(zip(near["id"], near["duplicate_of"])), dict(zip(near["id"], near["reason"]))
    twins = exact["duplicate_of"].tolist()
    exact["reason"] = [
        "eval_contamination" if why.get(t) == "eval_contamination" else r for t, r in zip(twins, exact["reason"])
    ]
    exact["duplicate_of"] = [rep.get(t, t) for t in twins]
    dups = pd.concat([exact, near], ignore_index=True)

    t = time.time()
    kept_uri, dropped_uri = sdir.sub("kept"), sdir.sub("dropped")
    for uri in (kept_uri, dropped_uri):
        url_to_fs(uri)[0].makedirs(url_to_fs(uri)[1], exist_ok=True)
    if here:
        counts = write_block(annotated, dups, kept_uri, dropped_uri) if n_input else _empty_counts()
    else:
        counts = dedup._to_pandas(
            annotated.map_batches(
                write_block,
                fn_kwargs={"dups": dups, "kept_uri": kept_uri, "dropped_uri": dropped_uri},
                batch_size=None,
                batch_format="pandas",
            ),
            _empty_counts(),
        )
    n_out = int(counts["rows"].sum())
    if n_out != n_input:
        raise RuntimeError(f"data stage lost rows: {n_input} read, {n_out} accounted for")
    for uri in (kept_uri, dropped_uri):
        schema_file_if_empty(uri)
    timings["write"] = time.time() - t
    timings["total"] = time.time() - t0

    stats = build_stats(counts, n_input, timings, dups, n_edges, sources)
    stats["executor"] = "in_process" if here else "ray_data"
    sdir.write_json("stats.json", stats)
    print(summary_table(stats))
    print(f"kept:    {sdir.sub('kept')}\ndropped: {sdir.sub('dropped')}\nstats:   {sdir.sub('stats.json')}")
    return {"input_rows": n_input, "kept": stats["kept"], "dropped": stats["dropped"]}


def build_stats(
    counts: pd.DataFrame, n_input: int, timings: dict, dups: pd.DataFrame, n_edges: int, sources: list[SourceConfig]
) -> dict[str, Any]:
    by_reason = counts.groupby("reason")["rows"].sum().astype(int).to_dict()
    kept_rows = counts[counts["reason"] == "kept"]
    dropped = {r: n for r, n in by_reason.items() if r != "kept"}
    by_step: dict[str, dict[str, int]] = {}
    for r, n in sorted(dropped.items()):
        by_step.setdefault(step_of(r), {})[r] = n
    cluster_sizes = (dups["duplicate_of"].value_counts() + 1).value_counts().sort_index() if len(dups) else {}
    return {
        "input_rows": n_input,
        "kept": int(kept_rows["rows"].sum()),
        "dropped": int(sum(dropped.values())),
        "accounted_rows": int(counts["rows"].sum()),
        "splits": kept_rows.groupby("split")["rows"].sum().astype(int).to_dict(),
        "dropped_by_step": by_step,
        "dropped_by_reason": dropped,
        "pii_redacted": _sum_pii(counts["pii_json"]),
        "duplicate_cluster_sizes": {int(k): int(v) for k, v in dict(cluster_sizes).items()},
        "near_dup_verified_edges": n_edges,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "throughput_docs_per_s": round(n_input / timings["total"], 1) if timings["total"] else None,
        "input_chars": int(counts["chars"].sum()),
        "sources": [s.path for s in sources],
    }


def summary_table(stats: dict[str, Any]) -> str:
    n = stats["input_rows"] or 1
    lines = [f"{'step':<14}{'reason':<28}{'rows':>8}{'share':>8}", "-" * 58]
    for step, reasons in stats["dropped_by_step"].items():
        for reason, rows in reasons.items():
            lines.append(f"{step:<14}{reason:<28}{rows:>8}{rows / n:>8.1%}")
    lines.append("-" * 58)
    splits = ", ".join(f"{k} {v}" for k, v in sorted(stats["splits"].items()))
    lines.append(f"{'kept':<42}{stats['kept']:>8}{stats['kept'] / n:>8.1%}   ({splits})")
    lines.append(f"{'input rows':<42}{stats['input_rows']:>8}")
    if stats["pii_redacted"]:
        lines.append("PII redacted: " + ", ".join(f"{k} {v}" for k, v in sorted(stats["pii_redacted"].items())))
    lines.append(f"{stats['throughput_docs_per_s']} docs/s; timings (s): {stats['timings_s']}")
    return "\n".join(lines)


def recap(s: dict[str, Any]) -> str:
    """One line for the end of `tailorlm run`."""
    return f"{s['input_rows']} rows in, {s['kept']} kept, {s['dropped']} dropped (reasons in stats.json)"
