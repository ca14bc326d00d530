"""The model registry of a run: `<run>/registry.json`, one entry per exported version with its
variants (URI, status, metrics). The export stage writes it; serving, the benchmarks and the
report read it here, never through the export stage's code.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from tailorlm.runs import RunDir

REGISTRY = "registry.json"


def next_version(run_dir: RunDir) -> str:
    """Semver plus date: 1.0.<n>+YYYYMMDD, n counting this run's exports."""
    n = len(read_registry(run_dir))
    return f"1.0.{n}+{dt.date.today():%Y%m%d}"


def read_registry(run_dir: RunDir) -> list[dict[str, Any]]:
    path = f"{run_dir.path}/{REGISTRY}"
    if not run_dir.fs.exists(path):
        return []
    with run_dir.fs.open(path, "r") as fh:
        return json.load(fh)


def latest_variant(run_dir: RunDir, variant: str) -> tuple[str, dict]:
    """(URI of a published variant of the newest registered version, its registry entry)."""
    reg = read_registry(run_dir)
    if not reg:
        raise FileNotFoundError(f"no exported model in {run_dir.uri}/{REGISTRY}: run `tailorlm export` first")
    entry = reg[-1]
    v = entry["variants"].get(variant)
    if not v or v["status"] == "refused":
        published = [k for k, x in entry["variants"].items() if x["status"] != "refused"]
        raise ValueError(
            f"serve.variant: {variant!r} is not published in version {entry['version']}; "
            f"published: {', '.join(published)}"
        )
    return v["uri"], entry


def register(run_dir: RunDir, entry: dict[str, Any]) -> None:
    """Append one version's entry."""
    registry = read_registry(run_dir) + [entry]
    with run_dir.fs.open(f"{run_dir.path}/{REGISTRY}", "w") as fh:
        json.dump(registry, fh, indent=2)
