"""A data stage killed midway (SIGKILL of the `tailorlm data` driver, its embedded Ray with it) and
rerun: no `_COMPLETE.json` after the kill, the rerun is not skipped, and it completes with every
input row exactly once across kept/ and dropped/ (nothing the killed run left is counted), the same
rows kept for the same reasons as an uninterrupted run.

The driver runs as a subprocess in a session of its own; the test SIGKILLs the driver (what the OOM
killer does), then every process left of its session (after the driver alone dies, Ray's GCS and
raylet follow at once, but its dashboard and runtime-env agents linger about a minute), and checks
that none is left, so the rest of the suite is not polluted.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tailorlm.runs import COMPLETE, FAILED, RunDir

pytestmark = pytest.mark.integration

N_DOCS = 1200
N_FILES = 4  # one Ray Data block per file: kept/ gets several files, so a kill can land between them


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A few input files of planted-corpus documents; returns the folder and every input `row`."""
    from tailorlm.bench.corpus import planted_corpus

    d = tmp_path_factory.mktemp("resume-corpus")
    docs, _ = planted_corpus(N_DOCS, seed=3)
    rows = []
    for k in range(N_FILES):
        part = docs.iloc[k::N_FILES]
        path = d / f"part{k}.jsonl"
        with open(path, "w", encoding="utf-8") as fh:
            for i, t in zip(part["id"], part["text"]):
                fh.write(json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n")
        rows += [f"{path}#{n}" for n in range(len(part))]
    return d, rows


class Driver:
    """`tailorlm data` in a session of its own (so every process of its Ray can be found: the
    raylet puts each worker in a process group of its own, but all stay in the driver's session),
    output to a log file."""

    def __init__(self, args: list[str], log: Path):
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # an embedded Ray of its own
        env["PYTHONUNBUFFERED"] = "1"
        self.log = log
        self.fh = open(log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tailorlm.cli", "data", *args],
            stdout=self.fh,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_until(self, cond, timeout: float = 300, every: float = 0.01) -> None:
        deadline = time.time() + timeout
        while not cond():
            if self.proc.poll() is not None:
                raise AssertionError(f"the driver exited ({self.proc.returncode}) too early:\n{self.output()[-3000:]}")
            if time.time() > deadline:
                raise AssertionError(f"timed out waiting on the driver:\n{self.output()[-3000:]}")
            time.sleep(every)

    def finish(self) -> str:
        """Wait until the stage is done, then kill the driver (its Ray's shutdown is not tested)."""
        self.wait_until(lambda: "[data] done in" in self.output(), every=0.1)
        self.kill()
        return self.output()

    def kill(self) -> None:
        """SIGKILL the driver, then every process left of its Ray; wait until none is alive."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        deadline = time.time() + 30
        while (left := session_members(self.proc.pid)) and time.time() < deadline:
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        self.fh.close()
        assert not left, f"processes of the killed driver's Ray are still alive: {left}"


def session_members(sid: int) -> dict[int, str]:
    """Live (not zombie) processes of a session."""
    import psutil

    out = {}
    for p in psutil.process_iter(["pid", "status", "name"]):
        with contextlib.suppress(OSError, psutil.Error):
            if os.getsid(p.pid) == sid and p.info["status"] != psutil.STATUS_ZOMBIE:
                out[p.pid] = p.info["name"]
    return out


@pytest.fixture
def drivers():
    """Start drivers; each is killed (with its Ray) at the end, whatever the test did."""
    started: list[Driver] = []

    def start(args: list[str], log: Path) -> Driver:
        started.append(Driver(args, log))
        return started[-1]

    yield start
    for d in started:
        if not d.fh.closed:
            d.kill()


def cheap_filters() -> list[str]:
    """No token-length filter where the config can switch it off (max_tokens null): then the stage
    builds no tokenizer and runs no filter actor, seconds less per run on 2 CPUs."""
    from tailorlm.config import FilterConfig

    try:
        FilterConfig(max_tokens=None)
    except ValueError:
        return ["data.filters.min_tokens=0"]
    return ["data.filters.min_tokens=0", "data.filters.max_tokens=null"]


def parquet_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.parquet")) if folder.is_dir() else []


def outputs(sdir: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    kept, dropped = (pd.concat([pd.read_parquet(f) for f in parquet_files(sdir / d)]) for d in ("kept", "dropped"))
    return kept, dropped, json.loads((sdir / "stats.json").read_text())


def check_exactly_once(sdir: Path, rows: list[str]) -> tuple[set, dict]:
    """Every input row once across kept/ and dropped/, stats.json matching the files; returns the
    kept rows and the dropped rows' reasons."""
    kept, dropped, stats = outputs(sdir)
    seen = kept["row"].tolist() + dropped["row"].tolist()
    assert len(seen) == len(rows), f"{len(seen)} rows in the outputs, {len(rows)} in the input"
    assert sorted(seen) == sorted(rows)
    assert stats["input_rows"] == stats["accounted_rows"] == len(rows)
    assert stats["kept"] == len(kept) and stats["dropped"] == len(dropped)
    assert len(kept) > len(rows) // 2  # most rows survive: the comparison below is not of empty sets
    return set(kept["row"]), dict(zip(dropped["row"], dropped["reason"]))


def test_killed_data_stage_reruns_to_complete_outputs(tmp_path, corpus, drivers):
    corpus_dir, rows = corpus
    args = [
        f"run.storage={tmp_path / 'runs'}",
        f"data.sources=[{{path: '{corpus_dir}'}}]",
        # random-word documents: no language or quality filter, so most rows are kept
        "data.filters.languages=[]",
        "data.filters.quality=false",
        *cheap_filters(),
        "data.dedup.exact=false",  # near dedup finds the exact copies too; one shuffle less per run
        "data.in_process_max_mb=0",  # Ray Data, whose write tasks are killed mid-write
    ]
    sdir = tmp_path / "runs" / "demo" / "data"
    stage = RunDir(str(tmp_path / "runs"), "demo").stage("data")

    # the reference: one uninterrupted run
    drivers(args, tmp_path / "ref.log").finish()
    ref_kept, ref_dropped = check_exactly_once(sdir, rows)
    assert stage.is_complete()

    # a forced rerun killed early (its body started reading, so the folder was cleared, before it
    # wrote anything): the old marker went with the old outputs, so nothing there says complete
    d = drivers([*args, "--force"], tmp_path / "early.log")
    # "Starting execution": Ray Data's log line as the stage body runs its first dataset, in this
    # run's stage log (console.py: the file starts with the driver's pid, library output goes there)
    data_log = tmp_path / "runs" / "demo" / "logs" / "data.log"

    def body_started() -> bool:
        text = data_log.read_text(errors="replace") if data_log.exists() else ""
        return f"(pid {d.proc.pid})" in text and "Starting execution" in text

    d.wait_until(lambda: "[data] starting" in d.output() and body_started())
    d.kill()
    assert not (sdir / COMPLETE).exists() and not stage.is_complete() and stage.marker() is None
    assert not parquet_files(sdir / "kept") and not (sdir / FAILED).exists()

    # a plain rerun (no --force: nothing is complete) killed while it writes kept/
    d = drivers(args, tmp_path / "mid.log")
    d.wait_until(lambda: bool(parquet_files(sdir / "kept")), every=0.005)
    d.kill()
    out = d.output()
    assert "[data] starting" in out and "already complete" not in out
    assert not (sdir / COMPLETE).exists() and not stage.is_complete() and stage.marker() is None
    left = parquet_files(sdir / "kept") + parquet_files(sdir / "dropped")
    assert left, "the killed run left no output: the kill came too early to test anything"
    assert not (sdir / "stats.json").exists(), "the kill came after the outputs were written"

    # the rerun is not skipped (outputs without a marker are not a finished stage) and completes
    # with every row once: no file the killed run left is counted with the new ones
    out = drivers(args, tmp_path / "rerun.log").finish()
    assert "[data] starting" in out and "already complete" not in out
    kept, dropped = check_exactly_once(sdir, rows)
    assert kept == ref_kept and dropped == ref_dropped
    assert stage.is_complete()


# -- the marker semantics the rerun relies on, each bug's smallest example (no Ray needed) -------
def finished_stage(tmp_path) -> tuple:
    sdir = RunDir(str(tmp_path), "r").stage("data")
    with sdir.running():
        (tmp_path / "r" / "data" / "kept").mkdir()
        (tmp_path / "r" / "data" / "kept" / "a.parquet").write_text("rows")
        sdir.write_json("stats.json", {"rows": 1})
    assert sdir.is_complete()
    return sdir, tmp_path / "r" / "data"


def test_a_clear_cut_short_leaves_no_marker(tmp_path, monkeypatch):
    """A rerun's clear killed after its first removal left `_COMPLETE.json` beside partly removed
    outputs whenever the storage listed the marker after an output (a local folder lists in its
    own order, not sorted): the next run skipped the stage as done."""
    sdir, d = finished_stage(tmp_path)
    ls, rm = sdir.fs.ls, sdir.fs.rm
    monkeypatch.setattr(
        sdir.fs, "ls", lambda p, detail=False: sorted(ls(p, detail=detail), key=lambda e: COMPLETE in e)
    )
    removed: list[str] = []

    def rm_then_die(path, recursive=False):
        if removed:
            raise KeyboardInterrupt("killed")
        removed.append(path)
        rm(path, recursive=recursive)

    monkeypatch.setattr(sdir.fs, "rm", rm_then_die)
    with pytest.raises(KeyboardInterrupt):
        sdir.clear()
    monkeypatch.undo()
    assert not (d / COMPLETE).exists() and not sdir.is_complete()


def test_a_marker_cut_short_is_no_marker(tmp_path, monkeypatch):
    """A `_COMPLETE.json` cut short (the writer killed between creating and closing it, a full
    disk) made every later run of the stage fail, `--force` too: `json.load` raised before the
    stage could clear it. An unreadable marker is no marker: the stage is not done, and reruns."""
    from tailorlm.config import load_config
    from tailorlm.pipeline import run_stage, stage_module
    from tailorlm.stages import BY_NAME

    cfg = load_config(None, [f"run.storage={tmp_path}", "run.name=r"])
    sdir, d = finished_stage(tmp_path)
    for cut in ("", '{\n  "finished": 17'):
        (d / COMPLETE).write_text(cut)
        assert sdir.marker() is None and not sdir.is_complete()
    monkeypatch.setattr(stage_module(BY_NAME["data"]), "run", lambda cfg, run_dir, sdir: {"rows": 2})
    marker = run_stage(cfg, "data", echo=lambda s: None)
    assert marker["summary"] == {"rows": 2} and not (d / "kept").exists()
