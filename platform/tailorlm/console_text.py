"""The console's rules about text: which lines are a stage's own messages, whose print a write
is, how a Ray worker's log batch reads in a file, and an error in one paragraph.

Pure functions (no state, no I/O), so the routing is tested without a pipeline run; console.py
applies them. Only the standard library: the CLI imports this before it decides on Ray.
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterator

from tailorlm.stages import NAMES

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# a stage's own message in a worker's output: "[train] step 10/60 ..."
TAG = re.compile(r"^\[(?:%s)\] " % "|".join(NAMES))
RAY_TQDM_MAGIC = "__ray_tqdm_magic_token__"  # ray.experimental.tqdm_ray's progress updates: noise in a file


def is_stage_message(line: str) -> bool:
    return bool(TAG.match(ANSI.sub("", line).lstrip("\r")))


# Modules whose print() replacement stands between a caller and sys.stdout.write: Ray's tqdm_ray
# installs one in the driver once a Ray Data progress bar ran (then every print went to the log),
# Ray Train and Serve in their processes. The caller is the frame above them.
PRINT_WRAPPERS = frozenset(
    {"ray.experimental.tqdm_ray", "ray.train.v2._internal.logging.patch_print", "ray.serve._private.logging_utils"}
)


def from_tailorlm(frame: Any) -> bool:
    """The frame that called print() (or write) is tailorlm's code, not a library's."""
    while frame is not None and frame.f_globals.get("__name__") in PRINT_WRAPPERS:
        frame = frame.f_back
    return frame is not None and (
        frame.f_globals.get("__name__", "").startswith("tailorlm") or frame.f_code.co_filename.startswith(PACKAGE_DIR)
    )


def worker_lines(batch: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(text for the log file, text for the console or "") per line of one Ray worker log batch,
    prefixed like Ray prints them: `(RayTrainWorker pid=123, ip=10.0.0.2) ...`."""
    pid = batch.get("pid")
    who = batch.get("actor_name") or batch.get("task_name") or ""
    ip = batch.get("ip")
    where = "" if ip in (None, batch.get("localhost")) else f", ip={ip}"
    prefix = f"({who + ' ' if who else ''}pid={pid}{where}) "
    for line in batch.get("lines", []):
        if RAY_TQDM_MAGIC in line:
            continue
        yield prefix + line, (ANSI.sub("", line).strip() if is_stage_message(line) else "")


def autoscaler_events(lines: list[str]) -> Iterator[str]:
    """The autoscaler's events (a request that cannot be scheduled...), as Ray's driver picks them."""
    try:
        from ray._private.worker import filter_autoscaler_events
    except ImportError:
        return iter(())
    return filter_autoscaler_events(lines)


def one_paragraph(exc: BaseException, limit: int = 700) -> str:
    """The error as one paragraph. Ray wraps a worker's exception (RayTaskError.cause, or a
    traceback inside the message of Ray Train's WorkerGroupError): the innermost one says what
    went wrong, the outer message's first line where."""
    outer = exc
    for _ in range(10):
        if type(exc).__module__.startswith("tailorlm"):
            break  # our own errors say what went wrong (StorageUnavailable names the storage, its cause does not)
        inner = getattr(exc, "cause", None)
        inner = inner if isinstance(inner, BaseException) else exc.__cause__
        if inner is None:
            break
        exc = inner
    text = ANSI.sub("", str(exc)).strip()
    if "Traceback (most recent call last)" in text:
        head, _, tail = text.partition("Traceback (most recent call last)")
        lines = tail.rsplit("Traceback (most recent call last)", 1)[-1].splitlines()[1:]
        raised = [ln for ln in lines if ln.strip() and not ln.startswith((" ", "\t"))]
        text = " ".join(p for p in (head.strip().splitlines()[:1] + raised[-1:]) if p)
    text = " ".join(text.split()) or "(no message)"
    name = type(exc).__name__ if exc is outer else f"{type(outer).__name__} <- {type(exc).__name__}"
    text = f"{name}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."
