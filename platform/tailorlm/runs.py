"""Run folders: `<storage>/<run name>/<stage>/`, completion markers, skip-if-done.

A stage writes its outputs under its folder and its marker `_COMPLETE.json` last. A stage that
fails writes `_FAILED.json` (the error) and removes its outputs, except the paths it declares
resumable (training checkpoints), so nothing left behind looks complete. `<storage>` is a local
path or any URI fsspec can write (s3://, gs://, memory://); fsspec does the storage work so the
same code runs on a laptop and against object storage.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Iterator

import fsspec
from fsspec.core import url_to_fs

COMPLETE = "_COMPLETE.json"
FAILED = "_FAILED.json"
STARTED = "_STARTED.json"  # written right after a run clears the folder: the folder is a stage's


def normalize_uri(uri: str) -> str:
    """Local paths become absolute (Ray Train and Tune reject relative storage paths); URIs stay."""
    import os

    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


def local_path(uri: str) -> str | None:
    """The plain filesystem path of a URI on local storage, or None for remote storage."""
    fs, path = url_to_fs(normalize_uri(uri))
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return path if "file" in protocols else None


def is_remote(uri: str) -> bool:
    """A URI of storage other than this machine's disk (s3://, gs://, memory://...)."""
    return "://" in uri and local_path(uri) is None


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


@dataclass
class StageDir:
    """One stage's folder inside a run."""

    uri: str
    stage: str
    resumable: tuple[str, ...] = ()  # subpaths kept when the stage fails (e.g. "checkpoints")
    fs: Any = field(init=False, repr=False)
    path: str = field(init=False)

    def __post_init__(self) -> None:
        self.uri = normalize_uri(self.uri)
        self.fs, self.path = url_to_fs(self.uri)

    def sub(self, *parts: str) -> str:
        """URI of a path inside this stage folder (what Ray Data / pyarrow writers take)."""
        return join(self.uri, *parts)

    # -- markers --------------------------------------------------------------------------
    def is_complete(self) -> bool:
        return self.marker() is not None

    def marker(self) -> dict[str, Any] | None:
        """The completion marker, or None. A marker that cannot be read (cut short: the writer was
        killed, or the disk was full, between creating the file and closing it) is no marker: the
        stage did not finish, and it reruns (otherwise every later run, --force too, fails on it)."""
        p = join(self.path, COMPLETE)
        if not self.fs.exists(p):
            return None
        try:
            with self.fs.open(p, "r") as f:
                marker = json.load(f)
        except (ValueError, UnicodeDecodeError):  # json.JSONDecodeError is a ValueError
            return None
        return marker if isinstance(marker, dict) else None

    def write_json(self, name: str, obj: Any) -> str:
        p = join(self.path, name)
        self.fs.makedirs(self.path, exist_ok=True)
        with self.fs.open(p, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=str)
        return join(self.uri, name)

    def open(self, name: str, mode: str = "r"):
        self.fs.makedirs(self.path, exist_ok=True)
        return self.fs.open(join(self.path, name), mode)

    def put(self, local_path: str, name: str) -> str:
        """Upload a local file or folder into the stage folder, replacing what is there: a task
        retried after a lost node must not nest its folder inside the first try's (fsspec puts a
        folder into an existing one as a subfolder)."""
        self.fs.makedirs(self.path, exist_ok=True)
        target = join(self.path, name)
        if self.fs.exists(target):
            self.fs.rm(target, recursive=True)
        self.fs.put(local_path, target, recursive=True)
        return join(self.uri, name)

    def read_json(self, name: str) -> Any:
        with self.fs.open(join(self.path, name), "r") as f:
            return json.load(f)

    def holds_other_files(self) -> bool:
        """The folder exists, is not empty and holds no marker of a stage run: it is someone's
        folder (`tailorlm data --output ./data` where ./data holds the input), which a run would
        empty. An empty, missing or earlier stage folder is not."""
        if not self.fs.exists(self.path):
            return False
        names = {e.rstrip("/").rsplit("/", 1)[-1] for e in self.fs.ls(self.path, detail=False)}
        return bool(names) and not names & {COMPLETE, FAILED, STARTED}

    def clear(self, keep: tuple[str, ...] = ()) -> None:
        """Remove everything in the stage folder except the top-level entries named in keep."""
        if not self.fs.exists(self.path):
            return
        # the marker first: a clear cut short (the driver killed, a storage error) must not leave
        # a marker beside partly removed outputs, whatever order the storage lists entries in
        if COMPLETE not in keep and self.fs.exists(join(self.path, COMPLETE)):
            self.fs.rm(join(self.path, COMPLETE))
        for entry in self.fs.ls(self.path, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if not any(fnmatch.fnmatchcase(name, k) for k in keep):  # names or patterns ("[0-9]*")
                self.fs.rm(entry, recursive=True)

    @contextlib.contextmanager
    def running(self, info: dict[str, Any] | None = None) -> Iterator["StageDir"]:
        """Wrap a stage body: clears stale output first, marks complete last, cleans on failure."""
        self.clear(keep=self.resumable)
        self.fs.makedirs(self.path, exist_ok=True)
        started = time.time()
        self.write_json(STARTED, {"stage": self.stage, "started": started})
        try:
            yield self
        except BaseException as exc:
            from tailorlm.storage_watch import StorageUnavailable

            if isinstance(exc, StorageUnavailable):
                raise  # nothing can be cleaned or written there; no marker says complete
            try:
                self.clear(keep=self.resumable)
                self.write_json(
                    FAILED,
                    {
                        "stage": self.stage,
                        "error": repr(exc),
                        "traceback": traceback.format_exc(),
                        "started": started,
                        "failed": time.time(),
                    },
                )
            except Exception as cleanup:  # noqa: BLE001 - the stage's own error is the one to report
                print(f"[{self.stage}] could not record the failure in {self.uri}: {cleanup!r}")
            raise
        self.write_json(
            COMPLETE,
            {
                "stage": self.stage,
                "started": started,
                "finished": time.time(),
                "seconds": round(time.time() - started, 3),
                **(info or {}),
            },
        )
        self.fs.rm(join(self.path, STARTED))  # the marker now says what it said


class RunDir:
    """`<storage>/<name>/`: the folder of one pipeline run."""

    def __init__(self, storage: str, name: str):
        self.storage = normalize_uri(storage)
        self.name = name
        self.uri = join(self.storage, name)
        self.fs, self.path = url_to_fs(self.uri)

    @classmethod
    def from_config(cls, cfg) -> "RunDir":
        return cls(cfg.run.storage, cfg.run.name)

    def stage(self, stage: str, resumable: tuple[str, ...] = ()) -> StageDir:
        return StageDir(join(self.uri, stage), stage, resumable)

    def write_text(self, name: str, text: str) -> str:
        self.fs.makedirs(self.path, exist_ok=True)
        with self.fs.open(join(self.path, name), "w") as f:
            f.write(text)
        return join(self.uri, name)


def open_uri(uri: str, mode: str = "rb"):
    return fsspec.open(uri, mode)
