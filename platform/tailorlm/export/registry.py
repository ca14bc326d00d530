"""The model registry of a run: `<run>/registry.json`, one entry per exported version with its
variants (URI, status, metrics), and `<run>/promoted.json`, which version the endpoint serves.
The export stage writes the registry; `tailorlm promote` / `rollback` the promotion; serving, the
benchmarks and the report read both here, never through the export stage's code.

Versions are MAJOR.MINOR.PATCH+YYYYMMDD: an export of a new training run bumps the minor version,
a re-export (re-quantization) of the same training the patch. With no promoted.json the newest
version is served; once a version has been promoted, the promoted one is, and a newer export is a
candidate until it is promoted.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from tailorlm.runs import RunDir

REGISTRY = "registry.json"
PROMOTED = "promoted.json"


def parse_version(version: str) -> tuple[int, int, int]:
    major, minor, patch = version.split("+", 1)[0].split(".")
    return int(major), int(minor), int(patch)


def next_version(run_dir: RunDir, training: str | None = None) -> str:
    """1.0.0+date first; then the minor version + 1 for a new training (`training`: an id of the
    train stage's output, kept in the entry), or the patch + 1 for another export of the same one."""
    reg = read_registry(run_dir)
    date = f"{dt.date.today():%Y%m%d}"
    if not reg:
        return f"1.0.0+{date}"
    major, minor, patch = max(parse_version(e["version"]) for e in reg)
    if training is not None and reg[-1].get("training") == training:
        return f"{major}.{minor}.{patch + 1}+{date}"
    return f"{major}.{minor + 1}.0+{date}"


def read_registry(run_dir: RunDir) -> list[dict[str, Any]]:
    path = f"{run_dir.path}/{REGISTRY}"
    if not run_dir.fs.exists(path):
        return []
    with run_dir.fs.open(path, "r") as fh:
        return json.load(fh)


def entry_of(run_dir: RunDir, version: str) -> dict[str, Any]:
    reg = read_registry(run_dir)
    for e in reg:
        if e["version"] == version or e["version"].split("+", 1)[0] == version:
            return e
    known = ", ".join(e["version"] for e in reg) or "none"
    raise ValueError(f"version {version!r} is not in {run_dir.uri}/{REGISTRY} (registered: {known})")


def read_promotions(run_dir: RunDir) -> list[dict[str, Any]]:
    path = f"{run_dir.path}/{PROMOTED}"
    if not run_dir.fs.exists(path):
        return []
    with run_dir.fs.open(path, "r") as fh:
        return json.load(fh)["history"]


def served_entry(run_dir: RunDir) -> dict[str, Any]:
    """The registry entry the endpoint serves: the promoted version, else the newest."""
    reg = read_registry(run_dir)
    if not reg:
        raise FileNotFoundError(f"no exported model in {run_dir.uri}/{REGISTRY}: run `tailorlm export` first")
    history = read_promotions(run_dir)
    return entry_of(run_dir, history[-1]["version"]) if history else reg[-1]


def promote(run_dir: RunDir, version: str, why: str = "promote") -> dict[str, Any]:
    """Make `version` the served one; the promotion history keeps every earlier one for rollback."""
    entry = entry_of(run_dir, version)
    if not any(v["status"] != "refused" for v in entry["variants"].values()):
        raise ValueError(f"version {entry['version']} has no published variant")
    history = read_promotions(run_dir)
    if not history:  # what was served before the first promotion: the newest, then
        history = [{"version": read_registry(run_dir)[-1]["version"], "why": "newest export", "at": _now()}]
    history.append({"version": entry["version"], "why": why, "at": _now()})
    _write_promotions(run_dir, history)
    return entry


def rollback(run_dir: RunDir) -> dict[str, Any]:
    """Serve again the version promoted before the current one."""
    history = read_promotions(run_dir)
    if len(history) < 2:
        raise ValueError(f"nothing to roll back to: {run_dir.uri}/{PROMOTED} holds no earlier promotion")
    back = history[-2]["version"]
    history.append({"version": back, "why": f"rollback from {history[-1]['version']}", "at": _now()})
    # the rolled-back promotion and the one it restored leave the stack: a second rollback goes further back
    history = [h for h in history[:-3]] + [history[-1]]
    _write_promotions(run_dir, history)
    return entry_of(run_dir, back)


def _write_promotions(run_dir: RunDir, history: list[dict[str, Any]]) -> None:
    run_dir.write_text(PROMOTED, json.dumps({"version": history[-1]["version"], "history": history}, indent=2))


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def latest_variant(run_dir: RunDir, variant: str) -> tuple[str, dict]:
    """(URI of a published variant of the served version (served_entry), its registry entry)."""
    entry = served_entry(run_dir)
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
    run_dir.fs.makedirs(run_dir.path, exist_ok=True)
    with run_dir.fs.open(f"{run_dir.path}/{REGISTRY}", "w") as fh:
        json.dump(registry, fh, indent=2)
