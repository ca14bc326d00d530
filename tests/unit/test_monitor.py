"""`tailorlm monitor` on a written data stage and traffic written by the capture writer itself:
held-out questions about the trained planets raise no alert, questions about planets the model
never saw do; too little traffic is an error; every check lands in the run's history."""

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tailorlm.config import load_config
from tailorlm.demo_data import document, planets, qa_pairs
from tailorlm.monitor.stage import read_history
from tailorlm.pipeline import run_stage
from tailorlm.runs import COMPLETE, RunDir
from tailorlm.serving.capture import REQUESTS, CaptureWriter


def write_data_stage(root):
    pairs = qa_pairs(planets(40))
    rng = random.Random(0)
    evals = {i for i in range(len(pairs)) if rng.random() < 0.1}  # a random split, as the data stage makes
    rows = {"id": [], "split": [], "text": [], "messages": []}
    for i, (q, a) in enumerate(pairs):
        rows["id"].append(f"qa{i}")
        rows["split"].append("eval" if i in evals else "train")
        rows["text"].append(f"{q}\n{a}")
        rows["messages"].append(json.dumps([{"role": "user", "content": q}, {"role": "assistant", "content": a}]))
    for j, f in enumerate(planets(40)):  # documents too, as the demo has: nobody's prompts (drift.prompts)
        rows["id"].append(f"doc{j}")
        rows["split"].append("train")
        rows["text"].append(document(f))
        rows["messages"].append(None)
    d = root / "demo" / "data"
    (d / "kept").mkdir(parents=True)
    pq.write_table(pa.table(rows), d / "kept" / "part-0.parquet")
    (d / COMPLETE).write_text("{}")
    return [q for i, (q, _) in enumerate(pairs) if i in evals]


def send(cfg, prompts, t0: float):
    """Traffic as serve.capture records it."""
    w = CaptureWriter(f"{RunDir.from_config(cfg).uri}/capture", cfg.serve.capture, [], [])
    for i, p in enumerate(prompts):
        w.offer(REQUESTS, {"time": t0 + i, "status": 200, "prompt_text": p, "_response": b""})
    w.flush_sync()


def test_monitor_alerts_on_drift_only_and_keeps_history(tmp_path):
    held_out = write_data_stage(tmp_path)
    cfg = load_config(None, [f"run.storage={tmp_path}", "monitor.window_rows=100"])
    with pytest.raises(ValueError, match="monitor.min_rows=20"):
        run_stage(cfg, "monitor", echo=lambda s: None)

    send(cfg, random.Random(0).choices(held_out, k=100), 0)  # in domain: eval questions of the trained planets
    calm = run_stage(cfg, "monitor", echo=lambda s: None)["summary"]
    assert calm["rows"] == 100 and not calm["alert"], calm
    assert calm["kl"] > calm["kl_excess"]  # the noise floor was taken off

    drifted = [q for q, _ in qa_pairs(planets(30, seed=99))]  # the same questions about unseen planets
    send(cfg, random.Random(1).choices(drifted, k=100), 1000)  # the newest 100 rows are all drifted
    alarm = run_stage(cfg, "monitor", echo=lambda s: None)["summary"]
    assert alarm["alert"] and alarm["kl_excess"] >= 0.15 > calm["kl_excess"], (calm, alarm)

    report = json.loads((tmp_path / "demo" / "monitor" / "drift.json").read_text())
    assert report["languages"]["traffic"] and abs(sum(report["lengths"]["traffic"].values()) - 1) < 1e-9
    # new planet names in the same question templates: KL sees them, TF-IDF relevance to the domain hardly does
    assert all(0 <= report["relevance"][k] <= 1 for k in ("traffic", "held_out"))
    history = read_history(RunDir.from_config(cfg))
    assert [h["alert"] for h in history] == [False, True]
    from tailorlm.report import render

    page = render(str(tmp_path / "demo"))
    assert "<h2>Monitoring</h2>" in page and "2 drift check(s)" in page and "drift alert" in page


def test_shadow_comparison_and_the_promotion_rule(tmp_path):
    """Mirrored pairs as the guard records them: agreement and p95 latency against the live model;
    a slow candidate fails the rule by name, and without monitor.quality nothing passes unseen."""
    from tailorlm.monitor.shadow import compare

    write_data_stage(tmp_path)
    cfg = load_config(None, [f"run.storage={tmp_path}", "serve.capture.enabled=true", "serve.shadow.version=1.1.0"])
    w = CaptureWriter(f"{RunDir.from_config(cfg).uri}/capture", cfg.serve.capture, [], [])
    assert compare(cfg, RunDir.from_config(cfg), None) is None  # nothing mirrored yet
    for i in range(20):
        live = json.dumps({"id": f"c{i}", "choices": [{"message": {"content": f"answer {i % 4}"}}]}).encode()
        w.offer(REQUESTS, {"time": i, "status": 200, "latency_s": 1.0, "prompt_text": "q", "_response": live})
        shadow = json.dumps({"id": f"s{i}", "choices": [{"message": {"content": f"answer {i % 2}"}}]}).encode()
        w.offer(
            "shadow",
            {
                "time": i,
                "live_id": f"c{i}",
                "version": "1.1.0+20261203",
                "status": 200,
                "latency_s": 1.5,
                "_response": shadow,
            },
        )
    w.flush_sync()
    out = compare(cfg, RunDir.from_config(cfg), None)
    assert out["mirrored"] == 20 and out["agreement"] == 0.5 and abs(out["p95_ratio"] - 1.5) < 1e-9
    assert not out["passes"] and any("p95 latency 1.50x" in r for r in out["why_not"])
    assert any("monitor.quality is off" in r for r in out["why_not"])
