"""Where the console's log files go: `<run>/logs/<name>.log` when the run storage is this
machine's disk; otherwise (s3://, gs://...) under the temp dir, per user, and uploaded to
`<run>/logs/` when each file is closed (a stage's log is read by people while it runs, and object
storage has no append). A run of `tailorlm data --output DIR` (no run folder) logs to the temp
dir under `adhoc`.
"""

from __future__ import annotations

import os
import re
import tempfile

__all__ = ["LogFiles"]


class LogFiles:
    """The folder a run's log files go to, and their upload when the run storage is remote."""

    def __init__(self, run_uri: str | None, name: str = "adhoc"):
        from tailorlm.runs import join, local_path

        local = local_path(run_uri) if run_uri else None
        self.remote = join(run_uri, "logs") if run_uri and not local else None
        if local:
            self.dir = os.path.join(local, "logs")
        else:  # per user: /tmp is shared, and a log may hold what a stage read
            user = f"tailorlm-{os.getuid()}" if hasattr(os, "getuid") else "tailorlm"
            self.dir = os.path.join(tempfile.gettempdir(), user, re.sub(r"[^\w.-]", "_", name), "logs")
        os.makedirs(self.dir, exist_ok=True)

    def path(self, name: str) -> str:
        return os.path.join(self.dir, f"{name}.log")

    def upload(self, name: str) -> str | None:
        if not self.remote:
            return None
        import fsspec

        from tailorlm.runs import join

        target = join(self.remote, f"{name}.log")
        fs, path = fsspec.core.url_to_fs(target)
        fs.put_file(self.path(name), path)
        return target
