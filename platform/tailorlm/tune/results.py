"""A sweep's results for people: trials named by their sampled values, the leaderboard, the plot."""

from __future__ import annotations

import math
import os
from typing import Any

from tailorlm.config import PipelineConfig


def error_reason(err: BaseException | None) -> str:
    """The exception line of a trial's error (a Ray task error starts with a header line)."""
    if err is None:
        return ""
    lines = [line.strip() for line in str(getattr(err, "cause", None) or err).splitlines() if line.strip()]
    return (lines[-1] if lines else repr(err))[:300]


def compact(v: Any) -> str:
    """A sampled value, short: 3.2e-04 for small or large floats, else 3 significant digits."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, float) and not v.is_integer() and (abs(v) < 1e-2 or abs(v) >= 1e4):
        return f"{v:.1e}"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def trial_tag(sampled: dict[str, Any], base: dict[str, Any]) -> str:
    """How a trial's progress lines start on the console: '[tune] trial lr=3.2e-04'."""
    return f"[tune] trial {trial_label(sampled, base['tune']['search_space'])}"


def trial_label(config: dict[str, Any], keys) -> str:
    """A trial named by its sampled values: 'lr=3.2e-04 warmup_steps=4' (a key by its last dotted
    component, or in full where two keys share it)."""
    keys = list(keys)
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return " ".join(
        f"{short if last.count(short) == 1 else k}={compact(config.get(k))}" for k, short in zip(keys, last)
    )


def trial_labels(results, keys) -> list[str]:
    """trial_label of each result; a label that repeats (the same point sampled twice) gets #2, #3..."""
    labels = [trial_label(r.config or {}, keys) for r in results]
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if labels.count(label) == 1 else f"{label} #{seen[label]}")
    return out


def leaderboard(results, cfg: PipelineConfig):
    import pandas as pd

    t = cfg.tune
    rows = []
    for r, label in zip(results, trial_labels(results, t.search_space)):
        df = r.metrics_dataframe
        has = df is not None and t.metric in df
        best = (df[t.metric].min() if t.mode == "min" else df[t.metric].max()) if has else math.nan
        last_step = int(df["step"].max()) if has and "step" in df else 0
        finished = has and "final" in df and bool(df["final"].fillna(False).astype(bool).any())
        status = "error" if r.error else ("finished" if finished else "stopped early")
        rows.append(
            {
                "trial": os.path.basename(r.path),
                "label": label,
                "status": status,
                t.metric: best,
                "steps": last_step,
                **{k: r.config.get(k) for k in t.search_space},
                "error": error_reason(r.error),
            }
        )
    board = pd.DataFrame(rows).sort_values(t.metric, ascending=t.mode == "min", na_position="last")
    return board.reset_index(drop=True)


def plot_trials(results, metric: str, path: str, keys=()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r, label in zip(results, trial_labels(results, keys)):
        df = r.metrics_dataframe
        if df is not None and metric in df and "step" in df:
            ax.plot(df["step"], df[metric], "o-", ms=3, label=label or os.path.basename(r.path))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if len(results) <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
