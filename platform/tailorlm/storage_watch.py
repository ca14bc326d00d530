"""Fail a stage, naming the storage, when remote run storage stops answering.

With the S3 server down, a stage does not fail by itself: Ray Data restarts the actors whose
constructors cannot load their model from storage, and retries their tasks, without end (seen on
the multi-node test cluster: a data stage hung for 10 minutes and more). So while a stage runs on
remote storage, a thread reads the stage's `_STARTED.json` every few seconds; when no read has
succeeded for `run.storage_timeout_s`, it interrupts the driver's main thread, and the stage fails
with `StorageUnavailable`, which says what storage and since when. An error the stage raises
itself while the storage is unreachable is reported the same way.
"""

from __future__ import annotations

import _thread
import contextlib
import threading
import time
from typing import Iterator

PROBE_EVERY_S = 3.0


class StorageUnavailable(OSError):
    pass


class _Watch:
    def __init__(self, fs, path: str, uri: str, timeout_s: float):
        self.fs, self.path, self.uri, self.timeout_s = fs, path, uri, timeout_s
        self.last_ok = time.monotonic()
        self.last_error: BaseException | None = None
        self.tripped = False
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def probe(self) -> None:
        """Reads, never from a cache; a read that hangs (retries with back-off) counts as down."""
        while not self.stop.is_set():
            try:
                self.fs.cat_file(self.path)
                self.last_ok, self.last_error = time.monotonic(), None
            except Exception as exc:  # noqa: BLE001 - any failure to read is the storage failing
                self.last_error = exc
            self.stop.wait(PROBE_EVERY_S)

    def check(self) -> None:
        while not self.stop.wait(1.0):
            with self.lock:  # never interrupt once the stage body has ended
                if self.down_for() > self.timeout_s and not self.stop.is_set():
                    self.tripped = True
                    _thread.interrupt_main()  # KeyboardInterrupt in the driver, turned into the error below
                    return

    def failing(self, within_s: float = 10.0) -> bool:
        """Whether a fresh read fails or gets no answer within within_s (a client retrying with
        back-off holds a read for a while before it raises). Asked when the stage itself failed:
        seen on the cluster, Ray Data's error came seconds after S3 stopped, before any probe."""
        result: dict = {}
        done = threading.Event()

        def read() -> None:
            try:
                self.fs.cat_file(self.path)
                result["ok"] = True
            except Exception as exc:  # noqa: BLE001
                result["error"] = exc
            finally:
                done.set()

        threading.Thread(target=read, daemon=True, name="storage-recheck").start()
        done.wait(within_s)
        if "error" in result:
            self.last_error = result["error"]
        return not result.get("ok", False)

    def down_for(self) -> float:
        return time.monotonic() - self.last_ok

    def error(self) -> StorageUnavailable:
        why = f"{type(self.last_error).__name__}: {self.last_error}" if self.last_error else "requests time out"
        return StorageUnavailable(
            f"run.storage {self.uri} has not answered for {self.down_for():.0f} s ({why}); "
            "the stage stopped and nothing was marked complete. Rerun when the storage is back "
            "(run.storage_timeout_s sets how long to wait)"
        )


@contextlib.contextmanager
def watch_storage(sdir, timeout_s: float | None) -> Iterator[None]:
    """Around a stage body (`StageDir.running` has written `_STARTED.json`); local storage is
    not watched (a failing local disk fails the stage's own writes at once), nor anything with
    timeout_s None."""
    from tailorlm.runs import STARTED, is_remote, join

    if timeout_s is None or not is_remote(sdir.uri):
        yield
        return
    import signal

    # interrupt_main() runs whatever SIGINT handler is set: nothing while it is ignored, and a
    # library's own handler may not raise (seen in the full suite). Python's own handler is put in
    # place for the stage's duration (main thread only) and the old one put back after.
    restore = None
    if threading.current_thread() is threading.main_thread():
        restore = signal.signal(signal.SIGINT, signal.default_int_handler)
    w = _Watch(sdir.fs, join(sdir.path, STARTED), sdir.uri, timeout_s)
    threads = [threading.Thread(target=f, daemon=True, name=f"storage-{f.__name__}") for f in (w.probe, w.check)]
    for t in threads:
        t.start()
    try:
        yield
    except KeyboardInterrupt:
        if w.tripped:
            raise w.error() from None
        raise
    except Exception as exc:
        with w.lock:
            w.stop.set()
        if w.tripped or w.failing():  # the stage failed while its storage fails: say so first
            raise w.error() from exc
        raise
    finally:
        with w.lock:
            w.stop.set()
        if restore is not None:
            signal.signal(signal.SIGINT, restore)
