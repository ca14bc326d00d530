"""Property tests: the real data stage (Ray Data on the local Ray) on generated corpora.

Invariants, checked on kept/ and dropped/ for every corpus (see corpora.py for what they hold):
the stage completes on any readable file; every input line appears exactly once across kept and
dropped; every dropped row has a reason (the known one for malformed, empty, short, too long
rows); `duplicate_of` is set exactly on duplicates and names a kept row, and a train row pointing
at an eval row is `eval_contamination`; no two kept rows have the same text; and the outputs are
identical when the stage runs again planned for 1 CPU instead of 2 with many small blocks, on
another executor (in the driver, Ray Data, Ray Data with the distributed dedup).

An example on Ray Data runs a whole pipeline (about 10 s on 2 cores; in the driver well under
1 s, so that executor gets many more examples of its own), so the default profile is bounded
and derandomized (the same corpora every run, no shrinking: CI time stays fixed);
HYPOTHESIS_PROFILE=nightly draws 25x more, at random, and shrinks what fails.
"""

from __future__ import annotations

import os
from collections import Counter
from contextlib import contextmanager

import pandas as pd
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from tailorlm.config import NearDedupConfig, load_config
from tailorlm.pipeline import run_stage

from .corpora import FIXED_REASON, Line, corpora, document, write_corpus

pytestmark = [pytest.mark.integration]

_COMMON = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
settings.register_profile(
    "data-stage", max_examples=7, derandomize=True, phases=[Phase.explicit, Phase.generate], **_COMMON
)
settings.register_profile("nightly", max_examples=175, print_blob=True, **_COMMON)
PROFILE = settings.get_profile("nightly" if os.environ.get("HYPOTHESIS_PROFILE") == "nightly" else "data-stage")

# how the stage runs: in the driver (small inputs, the default here), Ray Data with dedup in the
# driver (inputs over data.in_process_max_mb), Ray Data with the distributed dedup (over LOCAL_ROWS)
EXECUTORS = ["in_process", "ray_data", "ray_distributed_dedup"]
DUP_REASONS = {"exact_duplicate", "near_duplicate", "eval_contamination"}
knobs = st.fixed_dictionaries(
    {
        "eval_fraction": st.sampled_from([0.0, 0.05, 0.3]),
        "verify": st.sampled_from(["exact", "estimated"]),
        "threshold": st.sampled_from([0.5, 0.7, 0.8, 0.9]),
        "exact": st.booleans(),
        "gz": st.lists(st.booleans(), min_size=3, max_size=3),
        "blank_every": st.sampled_from([0, 3]),
        "executor": st.sampled_from(EXECUTORS),
    }
)
DEFAULT_KNOBS = {
    "eval_fraction": 0.05,
    "verify": "exact",
    "threshold": NearDedupConfig().threshold,
    "exact": True,
    "gz": [False] * 3,
    "blank_every": 0,
    "executor": "in_process",
}


def run_data(folder, knobs: dict) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    import json

    out = folder / f"out{len(list(folder.glob('out*')))}"
    cfg = load_config(
        None,
        [
            f"run.storage={folder}/runs",
            f"data.sources=[{{path: '{folder}/in'}}]",
            f"data.eval_fraction={knobs['eval_fraction']}",
            f"data.dedup.exact={str(knobs['exact']).lower()}",
            f"data.dedup.near.verify={knobs['verify']}",
            f"data.dedup.near.threshold={knobs['threshold']}",
            f"data.in_process_max_mb={8 if knobs['executor'] == 'in_process' else 0}",
        ],
    )
    from tailorlm.data import dedup

    with pytest.MonkeyPatch.context() as mp:  # every corpus here is small: force the path
        mp.setattr(dedup, "LOCAL_ROWS", 0 if knobs["executor"] == "ray_distributed_dedup" else 10**9)
        run_stage(cfg, "data", force=True, echo=lambda s: None, stage_uri=str(out))
    assert (out / "_COMPLETE.json").exists()
    kept, dropped = (pq.read_table(out / d).to_pandas() for d in ("kept", "dropped"))
    return kept, dropped, json.loads((out / "stats.json").read_text())


def check_invariants(
    expected: list[tuple[str, str, Line]], kept: pd.DataFrame, dropped: pd.DataFrame, stats: dict
) -> None:
    out = pd.concat([kept, dropped], ignore_index=True)
    # every input line exactly once (ids may repeat in the input: compare multisets)
    assert Counter(zip(out["source"], out["id"])) == Counter((p, i) for p, i, _ in expected)
    assert stats["input_rows"] == len(expected) and stats["kept"] == len(kept) and stats["dropped"] == len(dropped)

    assert kept["reason"].isna().all()
    assert dropped["reason"].map(lambda r: isinstance(r, str) and r != "").all()
    reason = dict(zip(zip(dropped["source"], dropped["id"]), dropped["reason"]))
    for path, i, line in expected:
        if line.kind in FIXED_REASON:
            assert reason.get((path, i)) == FIXED_REASON[line.kind], (path, i, line.kind)

    is_dup = dropped["reason"].isin(DUP_REASONS)
    assert dropped.loc[is_dup, "duplicate_of"].notna().all()
    assert dropped.loc[~is_dup, "duplicate_of"].isna().all() and kept["duplicate_of"].isna().all()
    split_of = dict(zip(kept["id"], kept["split"]))  # the split is a hash of the id: one per id
    for _, row in dropped[is_dup].iterrows():
        assert row["duplicate_of"] in split_of, f"{row['id']} is a duplicate of {row['duplicate_of']}, not kept"
        contaminated = row["split"] == "train" and split_of[row["duplicate_of"]] == "eval"
        assert (row["reason"] == "eval_contamination") == contaminated, row.to_dict()

    assert not kept["text"].duplicated().any(), kept.loc[kept["text"].duplicated(keep=False), ["id", "text"]]


def canonical(df: pd.DataFrame) -> pd.DataFrame:
    """Rows in a fixed order (Ray Data gives no order), missing values comparable."""
    df = df.astype({c: object for c in df.columns if c != "perplexity"}).fillna("")
    return df.sort_values([c for c in df.columns if c != "perplexity"]).reset_index(drop=True)


@contextmanager
def planned_for_one_cpu_and_small_blocks():
    """The stage sizes its hash partitions and filter actor pool from the CPUs Ray reports; small
    target blocks make Ray Data split every batch step's output into many blocks."""
    import ray
    from ray.data import DataContext

    ctx = DataContext.get_current()
    old = ctx.target_max_block_size
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ray, "cluster_resources", lambda: {"CPU": 1.0})
        ctx.target_max_block_size = 4096
        try:
            yield
        finally:
            ctx.target_max_block_size = old


@settings(PROFILE)
@given(lines=corpora(), knobs=knobs)
@example(lines=[], knobs=DEFAULT_KNOBS)
@example(lines=[Line("text", "a", document(1))], knobs=DEFAULT_KNOBS)
@example(lines=[Line("text", "a", document(1)), Line("text", "a", document(1))], knobs=DEFAULT_KNOBS)
@example(lines=[], knobs={**DEFAULT_KNOBS, "executor": "ray_distributed_dedup"})
@example(
    lines=[Line("text", "a", document(1)), Line("text", "a", document(1))],
    knobs={**DEFAULT_KNOBS, "executor": "ray_distributed_dedup"},
)
def test_every_corpus_is_accounted_for(ray_local, tmp_path_factory, lines, knobs):
    folder = tmp_path_factory.mktemp("corpus")
    expected = write_corpus(lines, folder / "in", knobs["gz"], knobs["blank_every"])
    kept, dropped, stats = run_data(folder, knobs)
    check_invariants(expected, kept, dropped, stats)


@settings(PROFILE, max_examples=PROFILE.max_examples * 10)
@given(lines=corpora(), knobs=knobs.map(lambda k: {**k, "executor": "in_process"}))
def test_every_corpus_is_accounted_for_in_process(tmp_path_factory, lines, knobs):
    """The same invariants on many more corpora: the driver's executor runs the same steps in a
    fraction of the time, and needs no Ray."""
    folder = tmp_path_factory.mktemp("corpus")
    expected = write_corpus(lines, folder / "in", knobs["gz"], knobs["blank_every"])
    kept, dropped, stats = run_data(folder, knobs)
    check_invariants(expected, kept, dropped, stats)
    assert stats["executor"] == "in_process"


@settings(PROFILE, max_examples=max(2, PROFILE.max_examples // 3))
@given(lines=corpora(max_rows=60), knobs=knobs)
def test_outputs_do_not_depend_on_parallelism_or_blocks(ray_local, tmp_path_factory, lines, knobs):
    folder = tmp_path_factory.mktemp("corpus")
    write_corpus(lines, folder / "in", knobs["gz"], knobs["blank_every"])
    first = run_data(folder, knobs)
    other = EXECUTORS[(EXECUTORS.index(knobs["executor"]) + 1) % len(EXECUTORS)]
    with planned_for_one_cpu_and_small_blocks():  # and on another executor
        second = run_data(folder, {**knobs, "executor": other})
    for a, b in zip(first[:2], second[:2]):
        pd.testing.assert_frame_equal(canonical(a), canonical(b))
