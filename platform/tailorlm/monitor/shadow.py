"""The shadow candidate (serve.shadow) against the live model: on the mirrored traffic (answer
agreement, token F1 between the two answers, p95 latency) and, with monitor.quality, on the
held-out questions; then the promotion rule (monitor.max_p95_ratio, eval metric at least the live
model's), and with monitor.auto_promote the promotion itself (serving/promotion.py)."""

from __future__ import annotations

from typing import Any

from tailorlm.config import PipelineConfig
from tailorlm.runs import RunDir


def read_capture(run_dir: RunDir, kind: str, columns: list[str]) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    from tailorlm.serving.capture import CAPTURE

    rows: list[dict[str, Any]] = []
    for f in sorted(run_dir.fs.glob(f"{run_dir.path}/{CAPTURE}/{kind}/part-*.parquet")):
        with run_dir.fs.open(f, "rb") as fh:
            rows += pq.read_table(fh, columns=columns).to_pylist()
    return rows


def p95(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


def compare(cfg: PipelineConfig, run_dir: RunDir, live_quality: float | None) -> dict[str, Any] | None:
    """The shadow comparison, or None when no serve.shadow.version is set or nothing was mirrored."""
    from tailorlm.serving.capture import REQUESTS, SHADOW
    from tailorlm.train.evaluate import normalize_answer, token_f1

    sc, mc = cfg.serve, cfg.monitor
    if not sc.shadow.version:
        return None
    shadows = [
        r
        for r in read_capture(run_dir, SHADOW, ["live_id", "version", "status", "latency_s", "answer"])
        if r["status"] == 200 and r["live_id"] and r["version"].split("+")[0] == sc.shadow.version.split("+")[0]
    ]
    live = {r["id"]: r for r in read_capture(run_dir, REQUESTS, ["id", "status", "latency_s", "answer"])}
    pairs = [(live[s["live_id"]], s) for s in shadows if s["live_id"] in live]
    if not pairs:
        return None
    agree = sum(normalize_answer(a["answer"] or "") == normalize_answer(b["answer"] or "") for a, b in pairs)
    live_p95, shadow_p95 = p95([a["latency_s"] for a, _ in pairs]), p95([b["latency_s"] for _, b in pairs])
    out: dict[str, Any] = {
        "version": shadows[0]["version"],
        "mirrored": len(pairs),
        "agreement": agree / len(pairs),
        "answer_f1": sum(token_f1(b["answer"] or "", a["answer"] or "") for a, b in pairs) / len(pairs),
        "live_p95_s": live_p95,
        "shadow_p95_s": shadow_p95,
        "p95_ratio": shadow_p95 / live_p95 if live_p95 else None,
    }
    reasons = []
    if out["p95_ratio"] is not None and out["p95_ratio"] > mc.max_p95_ratio:
        reasons.append(
            f"p95 latency {out['p95_ratio']:.2f}x the live model's (monitor.max_p95_ratio {mc.max_p95_ratio})"
        )
    if mc.quality:
        from tailorlm.monitor.quality import live_score

        out["quality"] = live_score(cfg, run_dir, sc.shadow_id())
        out["live_quality"] = live_quality
        if live_quality is not None and out["quality"] < live_quality:
            reasons.append(f"eval fact exact match {out['quality']:.2f} below the live model's {live_quality:.2f}")
    else:
        reasons.append("no eval comparison (monitor.quality is off)")
    out["passes"], out["why_not"] = not reasons, reasons
    if out["passes"] and mc.auto_promote:
        from tailorlm.serving.promotion import promote_version

        out["promoted"] = promote_version(cfg, sc.shadow.version)
    return out
