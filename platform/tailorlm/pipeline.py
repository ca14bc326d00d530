"""Run stages in order, skip finished ones, and say where every output went.

A stage is a function `run(cfg, run_dir, stage_dir) -> dict` in its own module, imported only
when it runs (so `tailorlm --help` stays fast and free of torch). The marker a stage writes
records the hash of the config sections it read; a finished stage whose inputs changed reruns.
"""

from __future__ import annotations

import importlib
import logging
import time
from types import ModuleType
from typing import Any, Callable

from tailorlm.config import PipelineConfig
from tailorlm.console import stage_log
from tailorlm.runs import RunDir, StageDir
from tailorlm.stages import BY_NAME, STAGES, Stage
from tailorlm.storage_watch import watch_storage

log = logging.getLogger(__name__)


class StageUnavailable(RuntimeError):
    pass


def stage_record(name: str) -> Stage:
    if name not in BY_NAME:
        raise ValueError(f"unknown stage {name!r}; stages are: {', '.join(BY_NAME)}")
    return BY_NAME[name]


def stage_module(stage: Stage) -> ModuleType:
    """The stage's module, imported only when it runs (so `tailorlm --help` stays free of torch)."""
    return importlib.import_module(stage.module)


def check_needs(stage: Stage, run_dir: RunDir) -> None:
    """Every stage whose outputs this one reads has finished: one message for all of them."""
    for need in stage.needs:
        sdir = run_dir.stage(need)
        if not sdir.is_complete():
            raise StageUnavailable(
                f"{stage.name}: no finished {need} stage at {sdir.uri}; run `tailorlm {need}` first (or `tailorlm run`)"
            )


def with_tuned(cfg: PipelineConfig, run_dir: RunDir, echo: Callable[[str], None]) -> PipelineConfig:
    """The config with the finished sweep's winning overrides applied (the same override path)."""
    from tailorlm.config import apply_overrides, validate
    from tailorlm.tune.stage import best_overrides

    best = best_overrides(run_dir)
    if best is None:
        raise StageUnavailable(
            "tune is enabled but has not finished: run `tailorlm tune` first (or set tune.enabled=false)"
        )
    echo(f"[train] applying the best tune trial: {best}")
    return validate(apply_overrides(cfg.to_dict(), best))


def stage_enabled(cfg: PipelineConfig, stage: str) -> bool:
    """In `tailorlm run`: tune and monitor only when their config enables them."""
    return {"tune": cfg.tune.enabled, "monitor": cfg.monitor.enabled}.get(stage, True)


def check_output(stage_uri: str) -> None:
    """An ad-hoc output folder (`tailorlm data --output`) must be new, empty or a stage's own: a
    run empties its folder first, and must not take the user's files with it."""
    if StageDir(stage_uri, "check").holds_other_files():
        raise ValueError(
            f"--output {stage_uri}: the folder holds files that are not a tailorlm stage's output, and a run "
            "empties its output folder first; name a new or empty folder"
        )


def run_stage(
    cfg: PipelineConfig,
    stage: str,
    force: bool = False,
    echo: Callable[[str], None] = print,
    stage_uri: str | None = None,
) -> dict:
    """Run one stage unless it already finished with the same inputs; returns its marker.

    stage_uri writes the stage somewhere other than its run folder (ad-hoc `tailorlm data --output`).
    """
    record = stage_record(stage)
    run_dir = RunDir.from_config(cfg)
    if not stage_uri:  # an ad-hoc output (`tailorlm data --output`) reads no other stage
        check_needs(record, run_dir)
    if stage == "train" and cfg.tune.enabled:
        cfg = with_tuned(cfg, run_dir, echo)
    fn = stage_module(record).run
    sdir = StageDir(stage_uri, stage, record.keeps) if stage_uri else run_dir.stage(stage, resumable=record.keeps)
    if stage_uri:
        check_output(stage_uri)
    inputs = cfg.section_hash("run", *record.reads)
    marker = sdir.marker()
    if marker and not force and not record.always_runs:  # serve and monitor are acts, not artifacts
        if marker.get("inputs") == inputs:
            echo(f"[{stage}] already complete, skipping (outputs: {sdir.uri}; use --force to rerun)")
            return marker
        echo(f"[{stage}] config changed since the last run: rerunning")
    echo(f"[{stage}] starting -> {sdir.uri}")
    t0 = time.time()
    info: dict[str, Any] = {"inputs": inputs, "outputs": sdir.uri}
    # an endpoint kept serving needs its storage only to start: a storage outage must not stop it
    watched = not (stage == "serve" and cfg.serve.keep_serving)
    timeout_s = cfg.run.storage_timeout_s if watched else None
    # stage_log: under the CLI's console, what the stage and its workers print goes to logs/<stage>.log
    with stage_log(stage), sdir.running(info), watch_storage(sdir, timeout_s):  # info: read for the marker
        info["summary"] = fn(cfg, run_dir, sdir) or {}
    marker = sdir.marker()
    echo(f"[{stage}] done in {time.time() - t0:.1f}s; outputs: {sdir.uri}")
    return marker


def run_pipeline(cfg: PipelineConfig, force: tuple[str, ...] = (), echo: Callable[[str], None] = print) -> dict:
    """data -> tune (when enabled) -> train -> export -> serve -> monitor (when enabled), skipping
    finished stages."""
    results: dict[str, Any] = {}
    for record in STAGES:
        stage = record.name
        if not stage_enabled(cfg, stage):
            echo(f"[{stage}] disabled in config, skipping")
            continue
        rerun = stage in force or "all" in force or record.always_runs
        results[stage] = run_stage(cfg, stage, force=rerun, echo=echo)
    return results


def recap(results: dict) -> str:
    """The end of `tailorlm run`: one line per stage (its module's recap) and where it wrote."""
    lines = ["", "=" * 72, "pipeline finished"]
    for stage, marker in results.items():
        summary = marker.get("summary")
        what = stage_module(BY_NAME[stage]).recap(summary) if summary else marker.get("status", "")
        lines.append(f"  {stage:7s} {what}")
        if marker.get("outputs"):
            lines.append(f"  {'':7s} -> {marker['outputs']}")
    return "\n".join(lines)
