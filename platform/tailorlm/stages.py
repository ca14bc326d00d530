"""The one table of stages. Adding a stage means one record here and one folder with a `stage.py`.

Each stage module exports `run(cfg, run_dir, stage_dir) -> summary` (its docstring shows the
command) and `recap(summary) -> str` (one line for the end of `tailorlm run`): no other module
knows a stage's summary keys. Stages meet through their artifacts in the run folder, read
through the producer's small public module (data/splits.py, export/registry.py), never through
each other's `stage.py`. Only the standard library here: `tailorlm --help` reads this table.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str
    help: str  # the CLI's help: the first clause (up to ";") is the short form
    module: str  # exports run() and recap()
    reads: tuple[str, ...]  # config sections whose hash decides whether a finished stage reruns
    needs: tuple[str, ...] = ()  # stages whose outputs it reads: they must have finished first
    keeps: tuple[str, ...] = ()  # subfolders (fnmatch patterns) a rerun or a failure keeps
    always_runs: bool = False  # not an artifact: `tailorlm run` runs it even when finished


STAGES: tuple[Stage, ...] = (
    Stage(
        "data",
        "clean, filter, PII-redact and deduplicate (exact + MinHash) the data sources on Ray Data; "
        "writes kept/ and dropped/ Parquet (every drop with its reason), train/eval splits and stats.json",
        "tailorlm.data.stage",
        ("model", "data", "continual"),
    ),
    Stage(
        "tune",
        "sweep hyperparameters of the train stage with Ray Tune (ASHA early stopping); writes a "
        "leaderboard and best.yaml",
        "tailorlm.tune.stage",
        ("model", "data", "train", "tune", "continual"),
        ("data",),
        ("sweep", "trials"),
    ),
    Stage(
        "train",
        "finetune the model (LoRA or full) with DeepSpeed on Ray Train; checkpoints, resume, eval; "
        "writes the final model in HF format",
        "tailorlm.train.stage",
        ("model", "data", "train", "tune", "continual"),
        ("data",),
        ("ray", "ray_inputs.json"),
    ),
    Stage(
        "export",
        "merge LoRA, quantize (W8A8, W4A16, FP8), evaluate each variant and register it",
        "tailorlm.export.stage",
        ("model", "data", "train", "tune", "export", "continual"),
        ("data", "train"),
        ("[0-9]*",),  # every registered version's folder: a rerun adds one, rollback needs the old
    ),
    Stage(
        "serve",
        "host the exported model on vLLM behind Ray Serve as an OpenAI-compatible HTTP API",
        "tailorlm.serving.stage",
        ("model", "data", "train", "tune", "export", "serve", "continual"),
        ("export",),
        always_runs=True,
    ),
    Stage(
        "monitor",
        "compare captured traffic (serve.capture) with the training data: unigram KL, lengths, "
        "languages, domain relevance; alerts on drift, writes drift.json and the run's monitoring history",
        "tailorlm.monitor.stage",
        ("model", "data", "monitor", "continual"),
        ("data",),
        always_runs=True,
    ),
)
BY_NAME = {s.name: s for s in STAGES}
NAMES = tuple(BY_NAME)
