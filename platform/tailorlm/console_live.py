"""On a terminal, the console keeps one live line at its bottom: the running stage, a spinner,
its elapsed time and the last thing it said, so a quiet minute (vLLM starting, a DeepSpeed
build) does not look like a hang. Lines printed go above it (rich's Live display); the line
goes away when the stage ends. Not on a pipe or a file (CI, `ray job submit`): plain lines there.
"""

from __future__ import annotations

from typing import TextIO


class LiveLine:
    def __init__(self, term: TextIO):
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.rich = Console(file=term, highlight=False, markup=False, emoji=False)
        # the console routes sys.stdout/stderr itself: rich must not replace them while live
        self.progress = Progress(
            SpinnerColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.description}", markup=False),
            console=self.rich,
            transient=True,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self.task = None
        self.name = ""
        self.progress.start()

    def print(self, line: str) -> None:
        if self.task is not None and line.strip():  # the live line: the stage's last word
            tag = f"[{self.name}] "
            said = line[len(tag) :] if line.startswith(tag) else line
            self.progress.update(self.task, description=tag + _short(said))
        self.rich.print(line, markup=False, highlight=False, soft_wrap=True)

    def stage(self, name: str | None) -> None:
        """The stage now running (None: between stages)."""
        if self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None
        if name:
            self.name = name
            self.task = self.progress.add_task(f"[{name}] running", total=None)
        self.progress.refresh()  # now: a line printed next must not redraw the stage that ended

    def stop(self) -> None:
        self.stage(None)
        self.progress.stop()


def _short(line: str, width: int = 100) -> str:
    line = " ".join(line.split())
    return line if len(line) <= width else line[: width - 3] + "..."


def live_line(term: TextIO) -> LiveLine | None:
    """A LiveLine when term is a terminal and rich is there; None otherwise."""
    try:
        if not term.isatty():
            return None
        return LiveLine(term)
    except (ImportError, OSError, ValueError):
        return None
