"""Regression tests for inputs the data stage once failed on, each its smallest failing example.

The property tests (tests/property/) found or confirmed these; they stay here as plain tests so a
regression fails the same way every time, whatever hypothesis draws.
"""

import json

import pandas as pd
import pyarrow.parquet as pq
import pytest

from tailorlm.config import load_config
from tailorlm.data.stage import OUT_SCHEMA
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


def run_data(tmp_path, lines: list[str], *overrides: str, name: str = "in.jsonl"):
    """`tailorlm data --input <file> --output <out>` on these lines, defaults otherwise (but a
    token floor the tiny tokenizer can meet); returns kept, dropped and stats."""
    src = tmp_path / name
    src.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    out = tmp_path / "out"
    cfg = load_config(
        None,
        [f"run.storage={tmp_path}/runs", f"data.sources=[{{path: '{src}'}}]", "data.filters.min_tokens=1", *overrides],
    )
    run_stage(cfg, "data", force=True, echo=lambda s: None, stage_uri=str(out))
    assert (out / "_COMPLETE.json").exists()
    kept, dropped = (pq.read_table(out / d).to_pandas() for d in ("kept", "dropped"))
    return kept, dropped, json.loads((out / "stats.json").read_text())


def test_one_clean_document_is_kept(ray_local, tmp_path):
    """The crash of issue 15: no candidate pair at all (any corpus without near duplicates) made
    the broadcast path index an empty, column-less frame: KeyError: 'a'."""
    kept, dropped, stats = run_data(tmp_path, [json.dumps({"id": "only", "text": DOC})])
    assert kept["id"].tolist() == ["only"] and dropped.empty
    assert stats["input_rows"] == 1 and stats["near_dup_verified_edges"] == 0


def test_empty_input_gives_complete_empty_outputs(ray_local, tmp_path):
    """An empty file (or one of blank lines) is a readable corpus of no rows: kept/ and dropped/
    hold the output schema and no rows, stats say 0, the stage completes."""
    for lines in ([], ["", "   "]):
        kept, dropped, stats = run_data(tmp_path, lines)
        for table in (kept, dropped):
            assert table.empty and list(table.columns) == OUT_SCHEMA.names
        assert stats["input_rows"] == stats["accounted_rows"] == stats["kept"] == stats["dropped"] == 0


def test_every_row_dropped_by_filters_before_dedup(ray_local, tmp_path):
    """No live row reaches exact or near dedup: the dedup steps see an empty dataset."""
    lines = [json.dumps({"text": "too short"}), json.dumps({"text": "too short"}), "{not json"]
    kept, dropped, stats = run_data(tmp_path, lines)
    assert kept.empty and list(kept.columns) == OUT_SCHEMA.names
    assert sorted(dropped["reason"]) == ["malformed_json", "too_short_chars", "too_short_chars"]
    assert stats["kept"] == 0 and stats["dropped"] == 3


def test_candidate_edges_without_pairs_or_without_verified_edges(ray_local):
    """Both edge-list paths (driver broadcast, distributed joins), both checks: no candidate pair
    (two unrelated documents), and candidates of which none verifies (threshold 1.0, a near copy)
    give an empty edge list with its columns, and no duplicates."""
    import ray

    from tailorlm.config import NearDedupConfig
    from tailorlm.data.dedup import EDGE_COLUMNS, add_signatures, candidate_edges, components

    near_copy = DOC.replace("morning", "evening")
    for texts in ([DOC, OTHER], [DOC, near_copy]):
        df = pd.DataFrame({"id": ["a", "b"], "text": texts, "priority": 0})
        cfg = NearDedupConfig(threshold=1.0)
        ds = (
            ray.data.from_pandas([df.iloc[:1], df.iloc[1:]])
            .map_batches(lambda b: add_signatures(b, cfg, [True] * len(b), seed=1), batch_format="pandas")
            .materialize()
        )
        for verify in ("estimated", "exact"):
            for broadcast_pairs in (1_000_000, 0):
                edges = candidate_edges(
                    ds, NearDedupConfig(threshold=1.0, verify=verify), 2, broadcast_pairs=broadcast_pairs
                )
                assert edges.empty and set(EDGE_COLUMNS) <= set(edges.columns), (texts[1][:20], verify)
                assert components(edges).empty


def test_repeated_ids_lose_one_copy_not_both(ray_local, tmp_path):
    """Found by the property tests: dedup told rows apart by id, so two lines with id "a" and the
    same text were both dropped as duplicates "of a" (nothing kept), and two near copies sharing
    an id hashed to one key and were never compared."""
    lines = [
        json.dumps({"id": "a", "text": DOC}),
        json.dumps({"id": "a", "text": DOC}),
        json.dumps({"id": "b", "text": OTHER}),
        json.dumps({"id": "b", "text": OTHER.replace("winter", "summer")}),
    ]
    kept, dropped, _ = run_data(tmp_path, lines, "data.eval_fraction=0.0", "data.dedup.near.threshold=0.7")
    assert sorted(kept["id"]) == ["a", "b"]
    assert sorted(zip(dropped["id"], dropped["reason"], dropped["duplicate_of"])) == [
        ("a", "exact_duplicate", "a"),
        ("b", "near_duplicate", "b"),
    ]
    src = str(tmp_path / "in.jsonl")
    assert sorted(kept["row"]) == [f"{src}#0", f"{src}#2"]  # ties go to the earlier line


def test_a_file_named_by_two_sources_is_an_error(ray_local, tmp_path):
    from tailorlm.config import SourceConfig
    from tailorlm.data.read import SourceError, plan_reads

    (tmp_path / "a.jsonl").write_text(json.dumps({"text": DOC}) + "\n")
    with pytest.raises(SourceError, match="more than one source"):
        plan_reads([SourceConfig(path=str(tmp_path / "a.jsonl")), SourceConfig(path=str(tmp_path / "*.jsonl"))])


@pytest.mark.parametrize("in_process_max_mb", [0, 8], ids=["ray_data", "in_process"])
def test_gzip_input_is_read_once(ray_local, tmp_path, in_process_max_mb):
    """Found by the property tests: Ray gunzipped .gz files by their name and parse_file gunzipped
    again, so every .jsonl.gz input failed ("not a valid gzip file"); a file that is not gzip
    under a .gz name is one clear SourceError, not a remote traceback."""
    import gzip

    from tailorlm.data.read import SourceError

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl.gz").write_bytes(gzip.compress((json.dumps({"id": "z", "text": DOC}) + "\n").encode()))
    cfg = load_config(
        None,
        [
            f"run.storage={tmp_path}/runs",
            f"data.sources=[{{path: '{tmp_path}/in'}}]",
            "data.filters.min_tokens=1",
            f"data.in_process_max_mb={in_process_max_mb}",
        ],
    )
    run_stage(cfg, "data", echo=lambda s: None, stage_uri=str(tmp_path / "out"))
    assert pq.read_table(tmp_path / "out" / "kept").to_pandas()["id"].tolist() == ["z"]
    (tmp_path / "in" / "a.jsonl.gz").write_bytes(b'{"text": "plain bytes under a .gz name"}\n')
    with pytest.raises(SourceError, match="not valid gzip"):
        run_stage(cfg, "data", force=True, echo=lambda s: None, stage_uri=str(tmp_path / "out"))


def test_exact_copy_of_a_contaminating_row_is_contamination(ray_local, tmp_path):
    """Found by the property tests: r1 is an exact copy of r0, r0 a near copy of the eval row r2.
    r1 pointed at r2 (the row kept in r0's place) but stayed `exact_duplicate`, not the
    `eval_contamination` every train row pointing at an eval row is. (Ids picked so that with
    run.seed 0 and eval_fraction 0.05 r2 is the only eval row.)"""
    near = DOC.replace("fishing boats", "fishing ships")
    lines = [
        json.dumps({"id": "r0", "text": near}),
        json.dumps({"id": "r1", "text": near}),
        json.dumps({"id": "r2", "text": DOC}),
    ]
    kept, dropped, _ = run_data(tmp_path, lines, "data.eval_fraction=0.05", "data.dedup.near.threshold=0.5")
    assert list(zip(kept["id"], kept["split"])) == [("r2", "eval")]
    assert sorted(zip(dropped["id"], dropped["reason"], dropped["duplicate_of"])) == [
        ("r0", "eval_contamination", "r2"),
        ("r1", "eval_contamination", "r2"),
    ]
