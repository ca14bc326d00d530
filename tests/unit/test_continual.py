"""The continual slice: rated captured answers, corrections and a replay sample of the previous
run's training rows, as data stage sources; then the data stage itself reads it."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tailorlm.config import load_config
from tailorlm.continual import build_slice
from tailorlm.runs import RunDir
from tailorlm.serving.capture import FEEDBACK, REQUESTS, CaptureWriter

from .test_monitor import write_data_stage


def serve_history(root, scores: list[float | None]):
    """Captured chats about planets, the i-th rated scores[i] (None: not rated)."""
    prev = load_config(None, [f"run.storage={root}"])
    w = CaptureWriter(f"{RunDir.from_config(prev).uri}/capture", prev.serve.capture, [], [])
    for i, score in enumerate(scores):
        answer = json.dumps({"id": f"c{i}", "choices": [{"message": {"content": f"Planet {i} has {i} moons."}}]})
        msgs = [{"role": "user", "content": f"How many moons does planet {i} have?"}]
        w.offer(
            REQUESTS,
            {
                "time": i,
                "status": 200,
                "prompt_text": msgs[0]["content"],
                "messages": msgs,
                "_response": answer.encode(),
            },
        )
        if score is not None:
            w.offer(FEEDBACK, {"id": f"f{i}", "time": i, "response_id": f"c{i}", "score": score})
    w.flush_sync()


def read_slice(folder) -> list[dict]:
    from pathlib import Path

    return [json.loads(line) for f in sorted(Path(folder).glob("*.jsonl")) for line in f.read_text().splitlines()]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    scores=st.lists(st.one_of(st.none(), st.sampled_from([0.0, 0.5, 1.0, 5.0])), min_size=1, max_size=12),
    share=st.sampled_from([0.0, 0.25, 0.5, 0.8]),
)
def test_property_the_slice_holds_every_well_rated_answer_once_plus_its_replay_share(tmp_path_factory, scores, share):
    root = tmp_path_factory.mktemp("c")
    write_data_stage(root)
    serve_history(root, scores)
    cfg = load_config(
        None, [f"run.storage={root}", "run.name=next", "continual.from_run=demo", f"continual.replay_share={share}"]
    )
    rated = [i for i, s in enumerate(scores) if s is not None and s >= 1.0]
    if not rated:
        with pytest.raises(ValueError, match="nothing new to learn"):
            build_slice(cfg, RunDir.from_config(cfg))
        return
    folder, counts = build_slice(cfg, RunDir.from_config(cfg))
    rows = read_slice(folder)
    learned = sorted(r["messages"][-1]["content"] for r in rows if r["origin"] == "rated")
    assert learned == sorted(f"Planet {i} has {i} moons." for i in rated)  # each once, nothing else
    assert counts["replay"] == round(len(rated) * share / (1 - share)) == sum(r["origin"] == "replay" for r in rows)


def test_corrections_promoted_base_and_the_data_stage_reads_the_slice(tmp_path):
    from tailorlm.config import ModelConfig
    from tailorlm.export.registry import register
    from tailorlm.models import resolve_base
    from tailorlm.pipeline import run_stage

    write_data_stage(tmp_path)
    serve_history(tmp_path, [1.0, None])
    fixes = tmp_path / "fixes.jsonl"
    fixes.write_text(
        json.dumps({"prompt": "What is the capital of Daleglen?", "answer": "The capital of Daleglen is Newport."})
        + "\n"
        + json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "Name Brookwood's main export."},
                    {"role": "assistant", "content": "Brookwood's main export is tin."},
                ]
            }
        )
        + "\n"
    )
    over = [
        f"run.storage={tmp_path}",
        "run.name=next",
        "continual.from_run=demo",
        f"continual.corrections={fixes}",
        "data.sources=[{path: continual}]",
    ]
    cfg = load_config(None, over)
    marker = run_stage(cfg, "data", echo=lambda s: None)
    stats = json.loads((tmp_path / "next" / "data" / "stats.json").read_text())
    assert marker["summary"] and stats  # the slice went through the whole data stage
    rows = read_slice(tmp_path / "next" / "_continual_sources")
    assert sum(r["origin"] == "correction" for r in rows) == 2 and sum(r["origin"] == "rated" for r in rows) == 1

    (tmp_path / "bad.jsonl").write_text('{"prompt": "no answer"}\n')
    with pytest.raises(ValueError, match="bad.jsonl line 1"):
        build_slice(
            load_config(None, [*over, f"continual.corrections={tmp_path / 'bad.jsonl'}"]), RunDir.from_config(cfg)
        )

    register(
        RunDir(str(tmp_path), "demo"),
        {"version": "1.0.0+1", "variants": {"bf16": {"status": "published", "uri": "/m/bf16"}}},
    )
    assert resolve_base(ModelConfig(base="promoted:demo"), str(tmp_path)) == "/m/bf16"


def test_forgetting_is_the_relative_drop_and_never_negative():
    from tailorlm.train.stage import forgetting, recap

    assert forgetting(1.0, 0.97) == pytest.approx(0.03) and forgetting(0.5, 0.9) == 0.0
    assert forgetting(None, 0.5) is None and forgetting(0.0, 0.0) == 0.0
    line = recap(
        {
            "method": "full",
            "steps": 2,
            "base_perplexity": 2.0,
            "perplexity": 1.0,
            "forgetting": 0.03,
            "old_fact_em": 0.97,
        }
    )
    assert "previous eval set 0.97, forgetting 3.0%" in line
