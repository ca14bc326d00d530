"""The data stage for real on a local Ray: every row accounted for, reasons, dedup, determinism."""

import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tailorlm.cli import main as cli_main
from tailorlm.config import load_config
from tailorlm.data.read import SourceError
from tailorlm.pipeline import run_stage

pytestmark = pytest.mark.integration

DOC = (
    "The harbor town of Ashbrook sits at the mouth of a wide river, and every morning the fishing boats "
    "return with their catch while the market opens beside the old stone bridge near the church."
)
OTHER = (
    "A small railway connects the valley villages with the coast, and in winter the line is kept open "
    "by crews who clear the snow from the tracks before the first train leaves the station at dawn."
)
ZH = (
    "泽菲尔星表中的一颗行星。这里的天空是红色的，它有三颗卫星。"
    "它的首都是一座古老的城市，许多商人每年都会来到这里进行贸易。"
)
THIRD = (
    "Every spring the orchard on the hill fills with blossom, and the beekeepers carry their hives up "
    "the narrow path so that the bees can work the trees while the weather stays warm and dry."
)
FOURTH = (
    "The old library keeps its maps in wide wooden drawers, and scholars come from distant cities to "
    "study the coastline as it was drawn by sailors who charted these waters two centuries ago."
)
DE = "Der kleine Hafen liegt an der Mündung eines breiten Flusses, und jeden Morgen kehren die Fischerboote zurück."


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    recs = [
        {"id": "d0-orig", "text": DOC},
        {"id": "d1-exact", "text": DOC},
        {"id": "d2-ws", "text": DOC.replace(" ", "   ", 5)},  # exact after normalization
        {"id": "d3-case", "text": DOC.upper()},  # near (case)
        {"id": "d4-subst", "text": DOC.replace("morning", "evening")},  # near (one word)
        {"id": "other", "text": OTHER},
        {"id": "pii", "text": THIRD.replace("hill", "hill (call 415-555-0132, mail ops@bees.example)")},
        {"id": "zh", "text": ZH},
        {"id": "de", "text": DE},
        {"id": "junk", "text": "$$$ ### %%% &&& *** $$$ ### %%% &&& *** $$$ ### %%%"},
        {"id": "empty", "text": "   "},
        {"id": "null", "text": None},
        {
            "instruction": "Describe the harbor town of Ashbrook in one sentence please.",
            "input": "",
            "output": "Ashbrook is a river-mouth harbor town with a market beside an old stone bridge.",
        },
    ]
    with open(d / "a.jsonl", "w") as fh:
        for r in recs:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        fh.write('{"id": "broken", "text": \n')
    pq.write_table(pa.table({"id": ["pq1"], "text": [FOURTH]}), d / "b.parquet")
    return d, len(recs) + 1 + 1


def _cfg(tmp_path, corpus_dir, *extra):
    return load_config(
        None,
        [
            f"run.storage={tmp_path}",
            f"data.sources=[{{path: '{corpus_dir}'}}]",
            "data.filters.min_tokens=1",
            "data.filters.quality_min_words=10",
            "data.eval_fraction=0.0",
            "data.dedup.near.threshold=0.7",
            *extra,
        ],
    )


def _read(stage_dir):
    return pd.read_parquet(stage_dir / "kept"), pd.read_parquet(stage_dir / "dropped")


@pytest.mark.parametrize("in_process_max_mb", [0, 8], ids=["ray_data", "in_process"])
def test_data_stage_accounts_for_every_row(ray_local, tmp_path, corpus, in_process_max_mb):
    corpus_dir, n_rows = corpus
    cfg = _cfg(tmp_path, corpus_dir, f"data.in_process_max_mb={in_process_max_mb}")
    run_stage(cfg, "data", echo=lambda s: None)
    sdir = tmp_path / "demo" / "data"
    kept, dropped = _read(sdir)
    ids = kept["id"].tolist() + dropped["id"].tolist()
    assert len(ids) == n_rows and len(set(ids)) == n_rows
    reason = dict(zip(dropped["id"], dropped["reason"]))
    dup_of = dict(zip(dropped["id"], dropped["duplicate_of"]))
    assert reason["d1-exact"] == "exact_duplicate" and dup_of["d1-exact"] == "d0-orig"
    assert reason["d2-ws"] == "exact_duplicate" and dup_of["d2-ws"] == "d0-orig"
    assert reason["d3-case"] == "near_duplicate" and dup_of["d3-case"] == "d0-orig"
    assert reason["d4-subst"] == "near_duplicate" and dup_of["d4-subst"] == "d0-orig"
    assert reason["de"] == "language:de"
    assert reason["junk"] == "quality:symbols"
    assert reason["empty"] == "empty" and reason["null"] == "missing_text"
    assert reason[f"{corpus_dir}/a.jsonl#13"] == "malformed_json"
    assert {"d0-orig", "other", "zh", "pq1", "pii"} <= set(kept["id"])
    assert set(dup_of[i] for i in dup_of if isinstance(dup_of[i], str)) <= set(kept["id"])
    pii_row = kept[kept["id"] == "pii"].iloc[0]
    assert "[PHONE]" in pii_row["text"] and "[EMAIL]" in pii_row["text"] and "415-555" in pii_row["raw_text"]
    alpaca = kept[kept["kind"] == "alpaca"].iloc[0]
    assert json.loads(alpaca["messages"])[1]["role"] == "assistant"
    stats = json.loads((sdir / "stats.json").read_text())
    assert stats["input_rows"] == stats["accounted_rows"] == n_rows
    assert stats["kept"] == len(kept) and stats["dropped"] == len(dropped)
    assert stats["dropped_by_step"]["dedup_exact"]["exact_duplicate"] == 2
    assert stats["pii_redacted"] == {"email": 1, "phone": 1}
    assert (sdir / "_COMPLETE.json").exists()
    assert stats["executor"] == ("ray_data" if in_process_max_mb == 0 else "in_process")

    # deterministic: a forced rerun keeps the same rows and picks the same representatives
    run_stage(cfg, "data", force=True, echo=lambda s: None)
    kept2, dropped2 = _read(sdir)
    assert sorted(kept2["id"]) == sorted(kept["id"])
    assert dict(zip(dropped2["id"], dropped2["duplicate_of"].fillna(""))) == dict(
        zip(dropped["id"], dropped["duplicate_of"].fillna(""))
    )


def test_decontamination_keeps_eval_row(ray_local, tmp_path, corpus):
    corpus_dir, _ = corpus
    # the split is a hash of the id: with half the rows in eval, check the rule wherever they land
    cfg = _cfg(tmp_path, corpus_dir, "data.eval_fraction=0.5", "data.dedup.exact=false")
    run_stage(cfg, "data", echo=lambda s: None)
    kept, dropped = _read(tmp_path / "demo" / "data")
    split = dict(zip(kept["id"], kept["split"]))
    group = ["d0-orig", "d1-exact", "d2-ws", "d3-case", "d4-subst"]
    survivors = [i for i in group if i in split]
    assert len(survivors) == 1
    contaminated = dropped[dropped["reason"] == "eval_contamination"]
    if split[survivors[0]] == "eval":
        # every train member of the group was dropped as contamination, pointing at the eval row
        assert len(contaminated) >= 1 and set(contaminated["duplicate_of"]) <= {survivors[0]}
    assert set(kept["split"]) <= {"train", "eval"}


def test_missing_input_fails_without_output(ray_local, tmp_path):
    cfg = load_config(None, [f"run.storage={tmp_path}", f"data.sources=[{{path: '{tmp_path}/nope.jsonl'}}]"])
    with pytest.raises(SourceError, match="does not exist"):
        run_stage(cfg, "data", echo=lambda s: None)
    sdir = tmp_path / "demo" / "data"
    assert not (sdir / "_COMPLETE.json").exists() and not (sdir / "kept").exists()
    assert (sdir / "_FAILED.json").exists()


def test_adhoc_cli_writes_to_output(ray_local, tmp_path, corpus):
    corpus_dir, n_rows = corpus
    out = tmp_path / "cleaned"
    rc = cli_main(["data", "--input", f"{corpus_dir}/*.jsonl", "--output", str(out), "data.filters.min_tokens=1"])
    assert rc == 0
    kept, dropped = _read(out)
    assert len(kept) + len(dropped) == n_rows - 1  # the parquet file is not in the glob
    assert (out / "stats.json").exists() and (out / "_COMPLETE.json").exists()
    assert cli_main(["data", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "x")]) == 1


def test_perplexity_filter_drops_exactly_the_rows_above_the_threshold(ray_local, tmp_path, corpus, tiny_model_path):
    from tailorlm.config import FilterConfig
    from tailorlm.data.normalize import normalize_text
    from tailorlm.data.perplexity import PerplexityFilter

    corpus_dir, n_rows = corpus
    scorer = PerplexityFilter(FilterConfig().model_dump(), tiny_model_path)
    # the stage scores normalized text (NFKC turns ZH's full-width commas into ASCII ones, which
    # moved its perplexity across the cut with another tokenizer)
    texts = [OTHER, FOURTH, THIRD.replace("hill", "hill (call 415-555-0132, mail ops@bees.example)"), ZH]
    ppl = dict(zip(["other", "pq1", "pii", "zh"], scorer.scores([normalize_text(t) for t in texts])))
    ranked = sorted(ppl, key=ppl.get)
    cut = (ppl[ranked[1]] + ppl[ranked[2]]) / 2  # two rows below, two above
    run_stage(_cfg(tmp_path, corpus_dir, f"data.filters.max_perplexity={cut}"), "data", echo=lambda s: None)
    kept, dropped = _read(tmp_path / "demo" / "data")
    assert len(kept) + len(dropped) == n_rows
    reason = dict(zip(dropped["id"], dropped["reason"]))
    assert {i for i in ppl if reason.get(i) == "perplexity:too_high"} == set(ranked[2:])
    assert set(ranked[:2]) <= set(kept["id"])
    scored = kept.set_index("id")["perplexity"]
    for i in ranked[:2]:
        assert scored[i] == pytest.approx(ppl[i], rel=1e-3)


def test_near_dedup_broadcast_and_join_paths_agree(ray_local):
    """Few candidate pairs are verified on the driver, many through distributed joins: same edges,
    with either check; the exact check's edges carry the true shingle Jaccard."""
    import numpy as np
    import ray

    from tailorlm.bench.corpus import edit, make_docs
    from tailorlm.config import NearDedupConfig
    from tailorlm.data.dedup import add_signatures, candidate_edges
    from tailorlm.data.minhash import true_jaccard

    rng = np.random.default_rng(3)
    texts = make_docs(rng, 120, words=60)
    for i in range(0, 60, 6):  # 10 near-duplicate pairs and one triple
        texts[i + 1] = edit(texts[i], "substitute_2pct", rng)
    texts[62] = texts[61] = edit(texts[60], "whitespace", rng)
    df = pd.DataFrame({"id": [f"d{i:03d}" for i in range(len(texts))], "text": texts, "priority": 0})
    sign_cfg = NearDedupConfig(threshold=0.7)
    ds = (
        ray.data.from_pandas([df.iloc[:50], df.iloc[50:]])
        .map_batches(lambda b: add_signatures(b, sign_cfg, [True] * len(b), seed=1), batch_format="pandas")
        .materialize()
    )

    def edges(cfg, **kw):
        e = candidate_edges(ds, cfg, 2, **kw)
        return sorted({(min(a, b), max(a, b), round(j, 6)) for a, b, j in zip(e["id_a"], e["id_b"], e["jaccard"])})

    for verify in ("estimated", "exact"):
        cfg = NearDedupConfig(threshold=0.7, verify=verify)
        broadcast, joined = edges(cfg), edges(cfg, broadcast_pairs=0)
        assert broadcast == joined
        found = {(a, b) for a, b, _ in broadcast}
        assert {("d060", "d061"), ("d060", "d062"), ("d061", "d062")} <= found
        assert sum((f"d{i:03d}", f"d{i + 1:03d}") in found for i in range(0, 60, 6)) >= 8
    text = dict(zip(df["id"], df["text"]))
    for a, b, j in broadcast:  # the exact check's edges
        assert j >= 0.7 and j == pytest.approx(true_jaccard(text[a], text[b], cfg.ngram, cfg.cjk_ngram), abs=1e-6)


def test_default_near_dedup_finds_a_lightly_edited_copy(ray_local):
    """Issue 15: the old default (0.8 on word 5-grams) never found a copy with 5% of its words
    substituted (5-gram Jaccard ~0.6); the default finds it, and not an unrelated document."""
    import numpy as np
    import ray

    from tailorlm.bench.corpus import edit, make_docs
    from tailorlm.config import NearDedupConfig
    from tailorlm.data.dedup import add_signatures, candidate_edges, near_duplicates
    from tailorlm.data.minhash import true_jaccard

    rng = np.random.default_rng(5)
    texts = make_docs(rng, 8)
    copy = edit(texts[0], "substitute_5pct", rng)
    assert 0.5 < true_jaccard(texts[0], copy) < 0.7  # word 5-grams
    df = pd.DataFrame(
        {"id": ["a-orig", "b-copy"] + [f"other{i}" for i in range(7)], "text": [texts[0], copy] + texts[1:]}
    )
    df["priority"] = 0

    def dedup(cfg):
        ds = (
            ray.data.from_pandas([df.iloc[:4], df.iloc[4:]])
            .map_batches(lambda b: add_signatures(b, cfg, [True] * len(b), seed=1), batch_format="pandas")
            .materialize()
        )
        return candidate_edges(ds, cfg, 2), near_duplicates(ds, cfg, 2)[0]

    edges, dups = dedup(NearDedupConfig())
    assert [(a, b) for a, b in zip(edges["id_a"], edges["id_b"])] in ([("a-orig", "b-copy")], [("b-copy", "a-orig")])
    assert dups[["id", "duplicate_of", "reason"]].values.tolist() == [["b-copy", "a-orig", "near_duplicate"]]
    old_edges, _ = dedup(NearDedupConfig(threshold=0.8, ngram=5, bands=16, rows=8))
    assert old_edges.empty


def test_each_planned_read_is_its_own_filter_task(ray_local, tmp_path):
    """Found at 1M documents: the filter actor pool asked Ray Data for batches of 512 rows, and
    its input blocks are the planned reads (one row each), so every read of the corpus was
    bundled into one task on one actor (one core for the whole step). Each read is a task now,
    one output block each at least."""
    from tailorlm.data.filters import any_model_filter
    from tailorlm.data.read import plan_reads
    from tailorlm.data.stage import annotate_ray

    for k in range(6):
        (tmp_path / f"part{k}.jsonl").write_text(json.dumps({"id": f"p{k}", "text": f"{DOC} {k}"}) + "\n")
    cfg = load_config(None, [f"data.sources=[{{path: '{tmp_path}'}}]", "data.filters.min_tokens=0"])
    assert any_model_filter(cfg.data.filters, None)  # the quality filter: the actor-pool path
    plan = plan_reads(cfg.data.sources)
    annotated = annotate_ray(plan, cfg.data, None, None, seed=0, cpus=2)
    assert len(plan) == 6 and annotated.count() == 6
    assert annotated.num_blocks() >= len(plan)


def test_a_small_input_never_contacts_ray(tmp_path):
    """`tailorlm data` on an input under data.in_process_max_mb runs in the driver: with
    RAY_ADDRESS naming a cluster that does not exist, it still completes (any contact with Ray
    would fail to connect)."""
    import os
    import subprocess
    import sys

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"r{i}", "text": f"{DOC} {i}"}) + "\n" for i in range(20)))
    out = tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9"}  # the discard port: nothing answers there
    cmd = [sys.executable, "-m", "tailorlm.cli", "data", "--input", str(src), "--output", str(out)]
    r = subprocess.run([*cmd, "data.filters.min_tokens=0"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["executor"] == "in_process" and stats["input_rows"] == 20
    assert (out / "_COMPLETE.json").exists()
