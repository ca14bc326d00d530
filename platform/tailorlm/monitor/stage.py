"""The monitor stage: is the served traffic still the traffic the model was trained for?

    tailorlm monitor jobs/configs/tiny_cpu.yaml          # once; cron it, or `ray job submit` it
    ray job submit --working-dir . -- tailorlm monitor jobs/configs/tiny_cpu.yaml

Reads the newest monitor.window_rows requests that serve.capture wrote to <run>/capture/requests
and compares their prompts with the training prompts of the data stage (monitor/drift.py):
unigram KL, length histogram, language mix, TF-IDF domain relevance. Unigram KL on a small window
is large even with no drift at all (a window of 50 in-domain demo questions: 0.19 nats), so the
alert compares `kl_excess`, the window's KL minus the mean KL of monitor.baseline_samples
samples of the same shape (same_shape_sample) of the held-out prompts (the noise floor), with
monitor.kl_alert. Writes
monitor/drift.json, appends the check to <run>/monitoring.jsonl (the history the report plots),
and sets the tailorlm_drift_kl / tailorlm_drift_alert gauges. Too little traffic is an error that
says so, never a check that passes.
"""

from __future__ import annotations

import datetime as dt
import json
import random
from typing import Any

from tailorlm.config import PipelineConfig
from tailorlm.monitor import drift
from tailorlm.runs import RunDir, StageDir

SUMMARY = ("checked_at", "rows", "kl", "kl_baseline", "kl_excess", "alert")
QUALITY = ("quality", "quality_promoted", "quality_low", "quality_alert")
HISTORY = "monitoring.jsonl"  # in the run folder: a stage folder is emptied by every rerun


def captured_prompts(run_dir: RunDir, window: int) -> tuple[list[str], int]:
    """(prompts of the newest `window` captured requests that succeeded, files read)."""
    import pyarrow.parquet as pq

    from tailorlm.serving.capture import CAPTURE, REQUESTS

    folder = f"{run_dir.path}/{CAPTURE}/{REQUESTS}"
    files = sorted(f for f in run_dir.fs.glob(f"{folder}/part-*.parquet"))  # names sort by time
    rows: list[dict] = []
    for f in reversed(files):
        with run_dir.fs.open(f, "rb") as fh:
            table = pq.read_table(fh)  # files written before a column existed lack it
            keep = [c for c in ("time", "status", "prompt_text", "messages", "user") if c in table.column_names]
            rows = table.select(keep).to_pylist() + rows
        if len(rows) >= 4 * window:  # enough even if many failed
            break
    from tailorlm.monitor.quality import PROBE_USER

    served = (r for r in rows if r["status"] == 200 and r["prompt_text"] and r.get("user") != PROBE_USER)
    ok = sorted(served, key=lambda r: r["time"])  # the monitor's own probes are not traffic
    # a chat's user turns, as the reference holds them (prompt_text has system turns and replies too)
    return [drift.prompt_of(r) if r.get("messages") else r["prompt_text"] for r in ok[-window:]], len(files)


def same_shape_sample(traffic: list[str], train: list[str], rng: random.Random) -> list[str]:
    """Training prompts shaped like the window: as many distinct prompts, each repeated as often as
    the window repeats its own. Users ask the same things again, and a window of 100 requests
    over 24 distinct in-domain questions has a unigram KL of ~1 nat to the training prompts from
    that concentration alone; a same-shape sample has the same, so what remains is new words."""
    from collections import Counter

    repeats = sorted(Counter(traffic).values(), reverse=True)
    picks = rng.sample(train, len(repeats)) if len(repeats) <= len(train) else rng.choices(train, k=len(repeats))
    return [p for p, k in zip(picks, repeats) for _ in range(k)]


def check(cfg: PipelineConfig, traffic: list[str], train: list[str], held_out: list[str]) -> dict[str, Any]:
    """One drift check of `traffic` against the training prompts (held_out: training's eval prompts,
    the relevance an in-domain prompt gets)."""
    mc = cfg.monitor
    q = drift.unigrams(train)
    kl = drift.kl_divergence(drift.unigrams(traffic), q, mc.smoothing)
    rng = random.Random(cfg.run.seed)
    # the floor from held-out prompts where there are any: a sample of the reference's own rows
    # measures nothing once the window has as many distinct prompts as the reference (review)
    pool = held_out or train
    floor = [
        drift.kl_divergence(drift.unigrams(same_shape_sample(traffic, pool, rng)), q, mc.smoothing)
        for _ in range(mc.baseline_samples)
    ]
    baseline = sum(floor) / len(floor)
    n = min(len(traffic), len(train))
    excess = max(kl - baseline, 0.0)
    return {
        "rows": len(traffic),
        "kl": round(kl, 4),
        "kl_baseline": round(baseline, 4),
        "kl_excess": round(excess, 4),
        "kl_alert_at": mc.kl_alert,
        "alert": excess >= mc.kl_alert,
        "lengths": {"traffic": drift.length_histogram(traffic), "train": drift.length_histogram(train)},
        "languages": {"traffic": drift.language_mix(traffic), "train": drift.language_mix(rng.sample(train, n))},
        "relevance": {
            "traffic": drift.mean_relevance(train, traffic),
            "held_out": drift.mean_relevance(train, held_out) if held_out else None,
        },
    }


def run(cfg: PipelineConfig, run_dir: RunDir, sdir: StageDir) -> dict[str, Any]:
    from tailorlm.data.splits import splits_rows

    mc = cfg.monitor
    traffic, files = captured_prompts(run_dir, mc.window_rows)
    if len(traffic) < mc.min_rows:
        raise ValueError(
            f"monitor: {len(traffic)} captured requests in {run_dir.uri}/capture/requests ({files} files), fewer "
            f"than monitor.min_rows={mc.min_rows}; serve with serve.capture.enabled=true and send traffic first"
        )
    kept = run_dir.stage("data").sub("kept")
    train, held_out = drift.prompts(splits_rows(kept, "train")), drift.prompts(splits_rows(kept, "eval"))
    if not train:
        raise ValueError(f"monitor: the data stage at {kept} kept no training rows to compare with")
    result = {
        "checked_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        **check(cfg, traffic, train, held_out),
    }
    if mc.quality:  # the live endpoint asked the held-out questions
        from tailorlm.monitor.quality import quality_check

        result.update(quality_check(cfg, run_dir, read_history(run_dir)))
    from tailorlm.monitor.shadow import compare

    shadow = compare(cfg, run_dir, result.get("quality"))
    if shadow is not None:
        result["shadow"] = shadow
        verdict = "passes the promotion rule" if shadow["passes"] else "; ".join(shadow["why_not"])
        print(
            f"[monitor] shadow {shadow['version']}: {shadow['mirrored']} mirrored requests, agreement "
            f"{shadow['agreement']:.2f}, p95 {shadow['p95_ratio'] or 0:.2f}x live; {verdict}"
            + (f"; {shadow['promoted']}" if "promoted" in shadow else "")
        )
    sdir.write_json("drift.json", result)
    append_history(run_dir, result)
    set_gauges(result)
    word = "ALERT: the traffic has drifted" if result["alert"] else "no drift"
    print(
        f"[monitor] {word}: unigram KL {result['kl']:.3f} over {result['rows']} requests, "
        f"{result['kl_excess']:.3f} above a same-shape training sample's (alert at {mc.kl_alert})"
    )
    if "quality" in result:
        promoted = result["quality_promoted"]
        print(
            f"[monitor] live fact exact match {result['quality']:.2f} (promoted model: "
            f"{'unknown' if promoted is None else f'{promoted:.2f}'})"
            + ("; ALERT: quality decayed" if result["quality_alert"] else "")
        )
    summary = {k: result[k] for k in (*SUMMARY, *QUALITY) if k in result}
    if shadow is not None:
        summary["shadow"] = {k: shadow[k] for k in ("version", "mirrored", "agreement", "p95_ratio", "passes")}
    return summary


def append_history(run_dir: RunDir, result: dict[str, Any]) -> None:
    """One line per check; rewritten whole (object stores cannot append)."""
    path = f"{run_dir.path}/{HISTORY}"
    old = run_dir.fs.cat_file(path).decode() if run_dir.fs.exists(path) else ""
    line = json.dumps({k: result[k] for k in (*SUMMARY, *QUALITY) if k in result})
    run_dir.write_text(HISTORY, old + line + "\n")


def read_history(run_dir: RunDir) -> list[dict[str, Any]]:
    path = f"{run_dir.path}/{HISTORY}"
    if not run_dir.fs.exists(path):
        return []
    out = []
    for line in run_dir.fs.cat_file(path).decode().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short (two monitors at once, a crash): skipped, not fatal
            continue
    return out


def set_gauges(result: dict[str, Any]) -> None:
    """The check as Prometheus gauges, held by a detached actor (GaugeKeeper) that sets them again
    every second: Ray's exporter forgets a gauge value once collected (serving/engine_metrics.py),
    and a `tailorlm monitor` driver exits long before the next scrape."""
    try:
        import ray

        if not ray.is_initialized():
            return
        keeper = (
            ray.remote(GaugeKeeper)
            .options(name=GaugeKeeper.NAME, namespace="tailorlm", lifetime="detached", get_if_exists=True, num_cpus=0)
            .remote()
        )
        values = [result["kl"], result["kl_excess"], float(result["alert"])]
        if "quality" in result:
            values += [result["quality"], float(result["quality_alert"])]
        ray.get(keeper.set.remote(values), timeout=60)
    except Exception as exc:  # metrics are a view of the check; drift.json and the history hold it
        print(f"[monitor] gauges not set: {exc}")


class GaugeKeeper:
    """The last check's gauges (metric_names.DRIFT_*, QUALITY*), set again every second."""

    NAME = "tailorlm_monitor_gauges"

    def __init__(self):
        from ray.util.metrics import Gauge

        from tailorlm import metric_names as m

        self.gauges = (
            Gauge(m.DRIFT_KL, "unigram KL of served prompts to the training prompts (nats)"),
            Gauge(m.DRIFT_KL_EXCESS, "drift KL above a same-shape training sample's"),
            Gauge(m.DRIFT_ALERT, "1 when the last drift check alerted"),
            Gauge(m.QUALITY, "the live endpoint's fact exact match on the held-out questions"),
            Gauge(m.QUALITY_ALERT, "1 when quality stayed below the promoted model's for monitor.quality_checks"),
        )
        self.values: tuple[float, ...] | None = None
        self.task = None

    async def set(self, values: list[float]) -> None:
        """The drift gauges' values, then (with monitor.quality) the quality gauges'."""
        import asyncio

        self.values = tuple(values)
        self._apply()
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._refresh())

    def _apply(self) -> None:
        for gauge, value in zip(self.gauges, self.values or ()):
            gauge.set(value)

    async def _refresh(self) -> None:
        import asyncio

        while True:
            await asyncio.sleep(1)
            self._apply()


def recap(s: dict[str, Any]) -> str:
    word = "ALERT, drifted" if s["alert"] else "no drift"
    return (
        f"{word}: unigram KL {s['kl']:.3f} over {s['rows']} captured requests "
        f"({s['kl_excess']:.3f} above the noise floor)"
    )
