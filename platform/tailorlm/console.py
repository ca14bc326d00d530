"""What a person sees while tailorlm runs: the stages' own messages; the rest goes to a log file.

A pipeline run drives Ray, Ray Data, Ray Train, DeepSpeed and vLLM, and every one of them prints
(hundreds of lines per stage, most of them from worker processes). The console shows:
- what tailorlm code in this process prints (stage start/done lines, summaries, the recap): the
  caller of `sys.stdout.write` is looked up, so library prints in the same process are filed;
- worker lines tagged with a stage name, `[train] step 10/60 eval_loss ...` (the convention for a
  stage message printed in a Ray worker);
- warnings from tailorlm's own loggers, and a failure in one paragraph with its log file's path.
Everything, shown or not, goes to `<run>/logs/<stage>.log` (`driver.log` for Ray's start-up and
what comes between stages): worker batches from Ray's log monitor, Python's sys.stdout/stderr,
and file descriptors 1 and 2 (C++ code such as Ray's core worker writes to them directly).
With remote run storage the files are written under the temp dir and uploaded to
`<run>/logs/` when each one is closed. `-v` shows everything live, as Ray prints it, and still
writes the files. The rules about lines are in console_text.py. Only the standard library (and
fsspec for an upload): the CLI imports this before it decides on Ray.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import threading
import time
import traceback
from typing import Any, Iterator, TextIO

from tailorlm.console_files import LogFiles
from tailorlm.console_text import autoscaler_events, from_tailorlm, one_paragraph, worker_lines

_active: "Console | None" = None


class Console:
    """Routes every line to the current log file and shows the few a person reads."""

    def __init__(self, logs: LogFiles, term: TextIO, verbose: bool = False):
        self.logs, self.term, self.verbose = logs, term, verbose
        self.err: TextIO = term  # where a failure is told (the terminal's stderr in a session)
        self.lock = threading.RLock()
        self.fh: TextIO | None = None
        self.name = ""
        self.opened: set[str] = set()
        self.failure: tuple[str, str] | None = None  # (stage, log path) of the stage that raised
        self.last_shown: tuple[Any, float] = (None, 0.0)
        self.live: Any = None  # console_live.LiveLine on a terminal (session)
        self.switch("driver")

    # -- files ----------------------------------------------------------------------------------
    def switch(self, name: str) -> None:
        """Close the current log file (uploading it) and write to <name>.log from now on: a stage
        that runs again starts its file afresh, keeping the previous run's as <name>.prev.log (a
        failure message pointed at it, and the rerun that resumes must not erase it); driver.log
        is appended to between stages."""
        with self.lock:
            self.close_file()
            mode = "a" if name in self.opened else "w"
            self.opened.add(name)
            path = self.logs.path(name)
            if mode == "w" and os.path.isfile(path) and os.path.getsize(path):
                os.replace(path, path[: -len(".log")] + ".prev.log")
            self.fh = open(path, mode, encoding="utf-8", errors="replace", buffering=1)
            self.name = name
            self.fh.write(f"--- {name} {time.strftime('%Y-%m-%d %H:%M:%S')} (pid {os.getpid()}) ---\n")

    def close_file(self) -> None:
        if self.fh is None:
            return
        self.fh.close()
        self.fh = None
        try:
            self.logs.upload(self.name)
        except Exception as exc:  # noqa: BLE001 - a log that cannot be uploaded must not fail the run
            self.show(f"[{self.name}] could not upload its log {self.logs.path(self.name)}: {exc!r}", file=False)

    @property
    def path(self) -> str:
        return self.logs.path(self.name)

    def file(self, text: str) -> None:
        with self.lock:
            if self.fh is not None:
                self.fh.write(text)

    def show(self, line: str, file: bool = True) -> None:
        with self.lock:
            if self.live is not None:
                self.live.print(line.rstrip("\n"))
            elif not self.term.closed:  # Ray's log thread may hand over a last batch as the session ends
                self.term.write(line.rstrip("\n") + "\n")
                self.term.flush()
            if file:
                self.file(line.rstrip("\n") + "\n")

    # -- sources --------------------------------------------------------------------------------
    def worker_batch(self, batch: dict[str, Any]) -> None:
        """Ray's handler for worker log batches (global_worker_stdstream_dispatcher)."""
        if batch.get("pid") == "autoscaler":  # its whole status table every few seconds: events only
            batch = {**batch, "lines": list(autoscaler_events(batch.get("lines", [])))}
        for logged, shown in worker_lines(batch):
            self.file(logged + "\n")
            # Ray Train's print patch in a worker writes a print twice (stdout, and its logger's
            # handler); Ray's own printing folds repeats as well
            key = (batch.get("pid"), shown)
            if shown and not (key == self.last_shown[0] and time.monotonic() - self.last_shown[1] < 5):
                self.show(shown, file=False)
                self.last_shown = (key, time.monotonic())

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Log to <name>.log while a stage runs; a failure leaves its traceback there."""
        back = self.name
        self.switch(name)
        if self.live is not None:
            self.live.stage(name)
        try:
            yield
        except BaseException:
            self.file(traceback.format_exc())
            self.failure = (name, self.path)
            raise
        finally:
            if self.live is not None:
                self.live.stage(None)
            self.switch(back)

    def report_failure(self, exc: BaseException, expected: bool = False) -> None:
        """The error in one paragraph, and the log that holds its traceback. An expected error
        (a config or a missing input the message explains) is told without its type's name."""
        stage, path = self.failure or ("", self.path)
        if not self.failure:  # raised outside a stage: driver.log gets the traceback
            self.file("".join(traceback.format_exception(exc)))
        text = " ".join(str(exc).split()) if expected else one_paragraph(exc)
        lines = [f"[{stage}] failed: {text}" if stage else f"error: {text}"]
        if not expected or stage:
            lines.append(f"{' ' * (len(stage) + 3) if stage else '  '}traceback and worker output: {path}")
        with self.lock:
            if self.live is not None:
                self.live.stop()
                self.live = None
            self.term.flush()
            for line in lines:
                self.err.write(line + "\n")
            self.err.flush()


class _Router(io.TextIOBase):
    """sys.stdout / sys.stderr: a write from tailorlm code to stdout is shown, the rest filed.
    Shown text goes out by whole lines (print() writes its pieces one call each)."""

    def __init__(self, console: Console, fd: int, shows: bool, verbose_to: TextIO | None):
        self.console, self.fd, self.shows, self.verbose_to = console, fd, shows, verbose_to
        self.pending = ""
        self.after: TextIO | None = None  # once the session ended: the stream it replaced

    def write(self, s: str) -> int:
        if self.after is not None:  # a logging handler made during the session still holds this
            return self.after.write(s)
        self.console.file(s)
        if self.verbose_to is not None:
            self.verbose_to.write(s)
        elif self.shows and from_tailorlm(sys._getframe(1)):
            with self.console.lock:
                *lines, self.pending = (self.pending + s).split("\n")
                for line in lines:
                    self.console.show(line, file=False)
        return len(s)

    def flush(self) -> None:
        (self.after or self.verbose_to or self.console.term).flush()

    def close_pending(self) -> None:
        if self.pending:
            self.console.show(self.pending, file=False)
            self.pending = ""

    def fileno(self) -> int:
        return self.fd

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"


def _drain(fd: int, console: Console) -> None:
    """What C/C++ code writes to fds 1 and 2 (Ray's core worker, a library's native code)."""
    import codecs

    dec = codecs.getincrementaldecoder("utf-8")("replace")
    while chunk := os.read(fd, 65536):
        console.file(dec.decode(chunk))
    os.close(fd)


class _ShowHandler(logging.Handler):
    def __init__(self, console: Console):
        super().__init__()
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        self.console.show(self.format(record), file=False)


def _logging(console: Console, verbose: bool) -> list[logging.Handler]:
    """Every record to the log file (through sys.stderr, now the console's); tailorlm's own
    warnings on the console as well."""
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    to_file = logging.StreamHandler(sys.stderr)
    to_file.setFormatter(fmt)
    handlers: list[logging.Handler] = [to_file]
    root = logging.getLogger()
    root.addHandler(to_file)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        shown = _ShowHandler(console)
        shown.setLevel(logging.WARNING)
        shown.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logging.getLogger("tailorlm").addHandler(shown)
        handlers.append(shown)
    return handlers


@contextlib.contextmanager
def session(logs: LogFiles, verbose: bool = False) -> Iterator[Console]:
    """The console of one CLI command: sys.stdout/stderr and fds 1 and 2 routed through it."""
    global _active
    sys.stdout.flush()
    sys.stderr.flush()
    old = sys.stdout, sys.stderr
    saved: dict[int, int] = {}
    drain = None
    if verbose:  # as before, live; the files get a copy of what Python writes
        term, err = old
    else:
        saved = {fd: os.dup(fd) for fd in (1, 2)}
        term = open(os.dup(1), "w", encoding="utf-8", errors="replace", buffering=1)
        err = open(os.dup(2), "w", encoding="utf-8", errors="replace", buffering=1)
        # Ray Data's progress bars are hundreds of redraws in a file; its log lines stay
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    console = Console(logs, term, verbose)
    console.err = err
    if saved:
        r, w = os.pipe()
        os.dup2(w, 1)
        os.dup2(w, 2)
        os.close(w)
        drain = threading.Thread(target=_drain, args=(r, console), name="tailorlm-console-fds", daemon=True)
        drain.start()
    if not verbose:
        from tailorlm.console_live import live_line

        console.live = live_line(term)
    routed = (
        _Router(console, 1, True, old[0] if verbose else None),
        _Router(console, 2, False, old[1] if verbose else None),
    )
    sys.stdout, sys.stderr = routed
    level = logging.getLogger().level
    handlers = _logging(console, verbose)
    _active = console
    try:
        yield console
    finally:
        _active = None
        _detach_ray(console)
        routed[0].close_pending()
        if console.live is not None:
            console.live.stop()
            console.live = None
        for h in handlers:
            logging.getLogger().removeHandler(h)
            logging.getLogger("tailorlm").removeHandler(h)
        logging.getLogger().setLevel(level)
        sys.stdout, sys.stderr = old
        routed[0].after, routed[1].after = old
        for fd, copy in saved.items():
            os.dup2(copy, fd)  # the pipe's last writer here is gone: the drain thread ends
            os.close(copy)
        if drain is not None:
            drain.join(timeout=2)  # a process Ray started may hold the pipe open: do not wait on it
        console.close_file()
        if saved:
            term.close()
            err.close()


def active() -> Console | None:
    return _active


def stage_log(name: str) -> contextlib.AbstractContextManager:
    """While a stage runs, its output goes to <run>/logs/<name>.log (nothing without a console)."""
    return _active.stage(name) if _active else contextlib.nullcontext()


def attach_ray(dashboard_url: str | None, resources: dict[str, float]) -> None:
    """After ray.init: worker log batches go through the console; Ray's dashboard shown once.

    Ray 2.60 prints worker batches from a handler named "ray_print_logs" on
    ray._private.worker.global_worker_stdstream_dispatcher (added by ray.init(log_to_driver=True));
    the console takes its place (under -v it is kept, and the console only files the batches)."""
    console = _active
    if console is None:
        return
    if not console.verbose:  # under -v Ray prints them through sys.stdout, which files them
        try:
            from ray._private import worker as ray_worker

            dispatcher = ray_worker.global_worker_stdstream_dispatcher
            dispatcher.remove_handler("ray_print_logs")
            dispatcher.remove_handler("tailorlm_console")
            dispatcher.add_handler("tailorlm_console", console.worker_batch)
        except (ImportError, AttributeError) as exc:  # another Ray: its workers print as Ray prints them
            console.show(f"[ray] worker output is not routed to the log file ({exc!r})")
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    if dashboard_url and "://" not in dashboard_url:
        dashboard_url = "http://" + dashboard_url
    where = f"; dashboard {dashboard_url}" if dashboard_url else ""
    console.show(f"[ray] {cpus:g} CPUs, {gpus:g} GPUs{where}")


def _detach_ray(console: Console) -> None:
    mod = sys.modules.get("ray._private.worker")
    dispatcher = getattr(mod, "global_worker_stdstream_dispatcher", None)
    if dispatcher is not None:
        dispatcher.remove_handler("tailorlm_console")
