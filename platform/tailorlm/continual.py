"""The next training slice from a served run (`continual`): what users rated well, what a user
corrected, and a replay sample of the previous training data, as data stage sources.

    tailorlm run jobs/configs/tiny_cpu.yaml run.name=demo-next continual.from_run=demo \\
        'data.sources=[{path: continual}]' model.base=promoted:demo train.method=lora

`data.sources: [{path: continual}]` is written here into `<run>/_continual_sources/` (chat rows as
JSONL, like the demo's sources), so the data stage cleans, redacts and deduplicates it like any
input (a new row that near-duplicates a replayed one is dropped as its duplicate).
`model.base: promoted:<run>` is that run's promoted (else newest) bf16 export (models.resolve_base).
Not built yet: measuring forgetting on the previous run's eval set, and an EWC penalty.
"""

from __future__ import annotations

import json
import random
from typing import Any

from tailorlm.config import PipelineConfig
from tailorlm.runs import RunDir

SOURCE = "continual"  # the data.sources path that names this slice
PROMOTED_PREFIX = "promoted:"  # model.base: promoted:<run name>


def rated_answers(prev: RunDir, min_score: float) -> list[dict[str, Any]]:
    """Captured answers whose best feedback score is >= min_score, as chat rows."""
    from tailorlm.monitor.shadow import read_capture
    from tailorlm.serving.capture import FEEDBACK, REQUESTS

    best: dict[str, float] = {}
    for f in read_capture(prev, FEEDBACK, ["response_id", "score"]):
        best[f["response_id"]] = max(best.get(f["response_id"], float("-inf")), f["score"])
    rows = []
    for r in read_capture(prev, REQUESTS, ["id", "status", "messages", "prompt_text", "answer"]):
        if r["status"] != 200 or not r["answer"] or best.get(r["id"], float("-inf")) < min_score:
            continue
        turns = json.loads(r["messages"]) if r["messages"] else [{"role": "user", "content": r["prompt_text"]}]
        rows.append({"messages": [*turns, {"role": "assistant", "content": r["answer"]}], "origin": "rated"})
    return rows


def corrections(path: str | None) -> list[dict[str, Any]]:
    """A user's corrected rows: JSONL of {"messages": [...]} or {"prompt": ..., "answer": ...}."""
    import fsspec

    if not path:
        return []
    rows = []
    with fsspec.open(path, "r", encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                messages = row.get("messages") or [
                    {"role": "user", "content": row["prompt"]},
                    {"role": "assistant", "content": row["answer"]},
                ]
            except (json.JSONDecodeError, KeyError, AttributeError, TypeError):
                raise ValueError(
                    f"continual.corrections: {path} line {n} is not a JSON object with messages, or prompt and answer"
                ) from None
            rows.append({"messages": messages, "origin": "correction"})
    return rows


def replay_rows(prev: RunDir, n: int, seed: int) -> list[dict[str, Any]]:
    """n of the previous run's training rows, seeded (chat rows as chat, text rows as text)."""
    from tailorlm.data.splits import splits_rows

    kept = prev.stage("data")
    if not kept.is_complete():
        raise ValueError(f"continual.from_run: {prev.uri} has no finished data stage to replay")
    train = splits_rows(kept.sub("kept"), "train")
    picked = random.Random(seed).sample(train, min(n, len(train)))
    return [
        {"messages": json.loads(r["messages"]), "origin": "replay"}
        if r["messages"]
        else {"text": r["text"], "origin": "replay"}
        for r in picked
    ]


def build_slice(cfg: PipelineConfig, run_dir: RunDir) -> tuple[str, dict[str, int]]:
    """Write the slice under <run>/_continual_sources/; returns (its folder, rows by origin)."""
    cc = cfg.continual
    if not cc.from_run:
        raise ValueError("data.sources: 'continual' needs continual.from_run (the served run to learn from)")
    prev = RunDir(cfg.run.storage, cc.from_run)
    new = rated_answers(prev, cc.min_score) + corrections(cc.corrections)
    if not new:
        raise ValueError(
            f"continual: nothing new to learn: no captured answer in {prev.uri}/capture rated >= "
            f"continual.min_score={cc.min_score}, and no continual.corrections file"
        )
    n_replay = round(len(new) * cc.replay_share / (1 - cc.replay_share))
    replay = replay_rows(prev, n_replay, cfg.run.seed)
    folder = f"{run_dir.uri}/_continual_sources"
    by_kind = {
        "chat.jsonl": [r for r in new + replay if "messages" in r],
        "text.jsonl": [r for r in replay if "text" in r],
    }
    import fsspec

    fs, path = fsspec.core.url_to_fs(folder)
    if fs.exists(path):
        fs.rm(path, recursive=True)  # a rerun rebuilds it from the capture as it is now
    fs.makedirs(path, exist_ok=True)
    for name, rows in by_kind.items():
        if rows:
            with fs.open(f"{path}/{name}", "w", encoding="utf-8") as fh:
                fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    counts = {o: sum(r["origin"] == o for r in new + replay) for o in ("rated", "correction", "replay")}
    print(f"[data] continual slice from {prev.uri}: {counts}")
    return folder, counts


def promoted_base(base: str, storage: str | None) -> str:
    """model.base promoted:<run> -> that run's served bf16 export (its URI)."""
    from tailorlm.export.registry import served_entry

    run = base[len(PROMOTED_PREFIX) :]
    if storage is None or not run:
        raise ValueError(f"model.base: {base!r} needs a run name and run.storage")
    entry = served_entry(RunDir(storage, run))
    v = entry["variants"].get("bf16")
    if not v or not v.get("uri"):
        raise ValueError(f"model.base: {base}: version {entry['version']} has no bf16 export")
    return v["uri"]
