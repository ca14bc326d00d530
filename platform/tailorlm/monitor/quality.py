"""Quality of the live endpoint: the run's held-out eval questions asked again through the served
API (the official openai client, greedy), scored with the train stage's fact exact match
(train/evaluate.answer_metrics), and compared with the promoted model's own score at training time
(<run>/train/eval.json). An alert needs monitor.quality_checks consecutive checks more than
monitor.quality_drop (relative) below it: one bad window is noise, three in a row is decay.
"""

from __future__ import annotations

import json
from typing import Any

from tailorlm.config import PipelineConfig
from tailorlm.runs import RunDir

PROBE_USER = "tailorlm-monitor"  # the OpenAI `user` of the monitor's own requests


def eval_pairs(run_dir: RunDir, n: int) -> list[tuple[str, str]]:
    """The first n held-out (question, reference) chat pairs by text: the same questions every check."""
    from tailorlm.data.splits import splits_rows

    pairs = []
    for row in sorted(splits_rows(run_dir.stage("data").sub("kept"), "eval"), key=lambda r: r["text"] or ""):
        msgs = json.loads(row["messages"]) if row.get("messages") else None
        if msgs and len(msgs) == 2 and msgs[0]["role"] == "user" and msgs[1]["role"] == "assistant":
            pairs.append((msgs[0]["content"], msgs[1]["content"]))
    return pairs[:n]


def promoted_score(run_dir: RunDir) -> float | None:
    """The served model's fact exact match on the eval split when it was trained."""
    path = f"{run_dir.stage('train').path}/eval.json"
    if not run_dir.fs.exists(path):
        return None
    with run_dir.fs.open(path, "r") as fh:
        return (json.load(fh).get("finetuned") or {}).get("fact_exact_match")


def ask_endpoint(
    cfg: PipelineConfig, questions: list[str], model: str | None = None, user: str = PROBE_USER
) -> list[str]:
    """Greedy answers of the endpoint (serve.model_id, or `model`), asked as `user`."""
    import openai

    from tailorlm.serving.keys import read_keys
    from tailorlm.serving.security import LOCAL_HOSTS

    sc, mc = cfg.serve, cfg.monitor
    host = "127.0.0.1" if sc.host in LOCAL_HOSTS | {"0.0.0.0"} else sc.host
    keys = read_keys(sc.guard)
    client = openai.OpenAI(
        base_url=mc.endpoint or f"http://{host}:{sc.port}/v1", api_key=keys[0] if keys else "none", timeout=120
    )
    out = []
    for q in questions:
        resp = client.chat.completions.create(
            model=model or sc.model_id,
            messages=[{"role": "user", "content": q}],
            max_tokens=48,
            temperature=0,
            user=user,  # captured like any request; the drift check leaves the monitor's own out
        )
        out.append(resp.choices[0].message.content or "")
    return out


def live_score(cfg: PipelineConfig, run_dir: RunDir, model: str | None = None) -> float:
    """Fact exact match of `model` (default: serve.model_id) on the held-out questions, live."""
    from tailorlm.train.evaluate import answer_metrics

    pairs = eval_pairs(run_dir, cfg.monitor.eval_rows)
    if not pairs:
        raise ValueError("monitor.quality: the data stage kept no held-out chat question to ask the endpoint")
    questions, refs = [q for q, _ in pairs], [r for _, r in pairs]
    return answer_metrics(questions, ask_endpoint(cfg, questions, model), refs)["fact_exact_match"]


def quality_check(cfg: PipelineConfig, run_dir: RunDir, history: list[dict[str, Any]]) -> dict[str, Any]:
    """This check's live fact exact match, the promoted score, and whether decay is alerted (this
    check and the quality_checks - 1 before it all below the promoted score by more than quality_drop)."""
    mc = cfg.monitor
    score = live_score(cfg, run_dir)
    promoted = promoted_score(run_dir)
    low = promoted is not None and score < promoted * (1 - mc.quality_drop)
    earlier = [h.get("quality_low") for h in history[-(mc.quality_checks - 1) :]] if mc.quality_checks > 1 else []
    alert = low and len(earlier) == mc.quality_checks - 1 and all(earlier)
    return {"quality": score, "quality_promoted": promoted, "quality_low": low, "quality_alert": alert}
