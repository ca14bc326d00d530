"""Run stages in order, skip finished ones, and say where every output went.

A stage is a function `run(cfg, run_dir, stage_dir) -> dict` in its own module, imported only
when it runs (so `tailorlm --help` stays fast and free of torch). The marker a stage writes
records the hash of the config sections it read; a finished stage whose inputs changed reruns.
"""

from __future__ import annotations

import importlib
import logging
import time
from typing import Any, Callable

from tailorlm.config import STAGES, PipelineConfig
from tailorlm.runs import RunDir, StageDir

log = logging.getLogger(__name__)

# stage -> (implementation "module:function", config sections it reads, resumable subfolders)
STAGE_IMPLS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "data": ("tailorlm.data.stage:run", ("model", "data"), ()),
    "tune": ("tailorlm.tune:run", ("model", "data", "train", "tune"), ("sweep", "trials")),
    "train": ("tailorlm.train.stage:run", ("model", "data", "train", "tune"), ("ray", "ray_inputs.json")),
    "export": ("tailorlm.export.stage:run", ("model", "data", "train", "tune", "export"), ()),
    "serve": ("tailorlm.serving.stage:run", ("model", "data", "train", "tune", "export", "serve"), ()),
}


class StageUnavailable(RuntimeError):
    pass


def stage_function(stage: str) -> Callable[..., dict[str, Any]]:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are: {', '.join(STAGES)}")
    if stage not in STAGE_IMPLS:
        raise StageUnavailable(f"stage '{stage}' is not implemented in this version of tailorlm yet")
    module, func = STAGE_IMPLS[stage][0].split(":")
    return getattr(importlib.import_module(module), func)


def with_tuned(cfg: PipelineConfig, run_dir: RunDir, echo: Callable[[str], None]) -> PipelineConfig:
    """The config with the finished sweep's winning overrides applied (the same override path)."""
    from tailorlm.config import apply_overrides, validate
    from tailorlm.tune import best_overrides

    best = best_overrides(run_dir)
    if best is None:
        raise StageUnavailable("tune is enabled but has not finished: run `tailorlm tune` first "
                               "(or set tune.enabled=false)")
    echo(f"[train] applying the best tune trial: {best}")
    return validate(apply_overrides(cfg.to_dict(), best))


def stage_enabled(cfg: PipelineConfig, stage: str) -> bool:
    return stage != "tune" or cfg.tune.enabled


def run_stage(cfg: PipelineConfig, stage: str, force: bool = False, echo: Callable[[str], None] = print,
              stage_uri: str | None = None) -> dict:
    """Run one stage unless it already finished with the same inputs; returns its marker.

    stage_uri writes the stage somewhere other than its run folder (ad-hoc `tailorlm data --output`).
    """
    fn = stage_function(stage)
    _, sections, resumable = STAGE_IMPLS[stage]
    run_dir = RunDir.from_config(cfg)
    if stage == "train" and cfg.tune.enabled:
        cfg = with_tuned(cfg, run_dir, echo)
    sdir = StageDir(stage_uri, stage, resumable) if stage_uri else run_dir.stage(stage, resumable=resumable)
    inputs = cfg.section_hash("run", *sections)
    marker = sdir.marker()
    if marker and not force:
        if marker.get("inputs") == inputs:
            echo(f"[{stage}] already complete, skipping (outputs: {sdir.uri}; use --force to rerun)")
            return marker
        echo(f"[{stage}] config changed since the last run: rerunning")
    echo(f"[{stage}] starting -> {sdir.uri}")
    t0 = time.time()
    info: dict[str, Any] = {"inputs": inputs, "outputs": sdir.uri}
    with sdir.running(info):  # reads info when it writes the marker, after the body succeeded
        info["summary"] = fn(cfg, run_dir, sdir) or {}
    marker = sdir.marker()
    echo(f"[{stage}] done in {time.time() - t0:.1f}s; outputs: {sdir.uri}")
    return marker


def run_pipeline(cfg: PipelineConfig, force: tuple[str, ...] = (), echo: Callable[[str], None] = print) -> dict:
    """data -> tune (when enabled) -> train -> export -> serve, skipping finished stages."""
    results: dict[str, Any] = {}
    for stage in STAGES:
        if not stage_enabled(cfg, stage):
            echo(f"[{stage}] disabled in config, skipping")
            continue
        if stage not in STAGE_IMPLS:
            echo(f"[{stage}] not implemented in this version yet, skipping")
            results[stage] = {"status": "unavailable"}
            continue
        # serving is not an artifact: it always runs
        results[stage] = run_stage(cfg, stage, force=stage in force or "all" in force or stage == "serve", echo=echo)
    return results
