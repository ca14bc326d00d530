"""`tailorlm report RUN_DIR`: one static HTML page about a pipeline run, plots embedded as images.

    tailorlm report runs/demo              # writes runs/demo/report.html

Sections appear for the stages that finished: the data funnel (rows kept and dropped by reason)
and dedup cluster sizes, training and eval curves with the before/after table, the tune
leaderboard and trial curves, export variants with quality and size, and the serving check.
"""

from __future__ import annotations

import base64
import html
import io
import json
from typing import Any

from tailorlm.runs import RunDir


def _read_json(run: RunDir, rel: str) -> Any | None:
    path = f"{run.path}/{rel}"
    if not run.fs.exists(path):
        return None
    with run.fs.open(path, "r") as fh:
        return json.load(fh)


def _img_from_file(run: RunDir, rel: str) -> str:
    path = f"{run.path}/{rel}"
    if not run.fs.exists(path):
        return ""
    with run.fs.open(path, "rb") as fh:
        return f'<img alt="{html.escape(rel)}" src="data:image/png;base64,{base64.b64encode(fh.read()).decode()}">'


def _img_from_figure(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(c, ''))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def data_section(run: RunDir) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = _read_json(run, "data/stats.json")
    if not stats:
        return ""
    reasons = sorted(stats["dropped_by_reason"].items(), key=lambda kv: -kv[1])
    fig, ax = plt.subplots(figsize=(7, 0.35 * (len(reasons) + 1) + 1))
    ax.barh(
        ["kept"] + [r for r, _ in reasons],
        [stats["kept"]] + [n for _, n in reasons],
        color=["tab:green"] + ["tab:red"] * len(reasons),
    )
    ax.invert_yaxis()
    ax.set_xlabel("rows")
    ax.set_title(f"data funnel: {stats['input_rows']} rows in")
    parts = [
        f"<h2>Data</h2><p>{stats['input_rows']} rows read, {stats['kept']} kept "
        f"({', '.join(f'{k} {v}' for k, v in stats['splits'].items())}), {stats['dropped']} dropped. "
        f"PII redacted: {html.escape(json.dumps(stats['pii_redacted']))}.</p>",
        _img_from_figure(fig),
    ]
    sizes = stats.get("duplicate_cluster_sizes") or {}
    if sizes:
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.bar([str(k) for k in sizes], list(sizes.values()))
        ax.set_xlabel("duplicate cluster size (rows)")
        ax.set_ylabel("clusters")
        parts.append(_img_from_figure(fig))
    parts.append(
        _table(
            [{"step": s, "reason": r, "rows": n} for s, d in stats["dropped_by_step"].items() for r, n in d.items()],
            ["step", "reason", "rows"],
        )
    )
    return "\n".join(parts)


def train_section(run: RunDir) -> str:
    report = _read_json(run, "train/eval.json")
    if not report:
        return ""
    keys = [k for k in ("perplexity", "exact_match", "f1", "rouge_l") if k in report["finetuned"]]
    rows = [{"metric": k, "base": report["base"].get(k, ""), "finetuned": report["finetuned"][k]} for k in keys]
    samples = report["finetuned"].get("samples", [])
    return "\n".join(
        [
            f"<h2>Training</h2><p>best checkpoint at step {report['best_checkpoint_step']} of "
            f"{report['total_steps']}, eval loss {report['best_eval_loss']:.4f}.</p>",
            _img_from_file(run, "train/loss.png"),
            _table(rows, ["metric", "base", "finetuned"]),
            _table(samples, ["prompt", "reference", "answer"]) if samples else "",
        ]
    )


def tune_section(run: RunDir) -> str:
    board = _read_json(run, "tune/leaderboard.json")
    if not board:
        return ""
    cols = [c for c in board[0] if c != "trial"]
    return "\n".join(["<h2>Tune</h2>", _table(board, ["trial", *cols]), _img_from_file(run, "tune/trials.png")])


def export_section(run: RunDir) -> str:
    registry = _read_json(run, "registry.json")
    if not registry:
        return ""
    latest = registry[-1]
    rows = [
        {
            "variant": k,
            **{m: v.get(m, "") for m in ("perplexity", "ppl_increase", "greedy_agreement", "size_bytes", "status")},
        }
        for k, v in latest["variants"].items()
    ]
    return "\n".join(
        [
            f"<h2>Export</h2><p>version {html.escape(latest['version'])}, {len(registry)} version(s) registered.</p>",
            _table(rows, ["variant", "perplexity", "ppl_increase", "greedy_agreement", "size_bytes", "status"]),
        ]
    )


def serve_section(run: RunDir) -> str:
    info = _read_json(run, "serve/endpoint.json")
    bench = _read_json(run, "bench/serve.json")  # written by `python -m tailorlm.bench.serve --run-dir`
    if not info and not bench:
        return ""
    parts = ["<h2>Serving</h2>"]
    if info:
        s = info["sample"]
        parts.append(
            f"<p>{html.escape(info['url'])} served {html.escape(', '.join(info['models']))}.</p>"
            f"<p>Q: {html.escape(s['question'])}<br>A: {html.escape(str(s['answer']))} "
            f"({s['latency_s']} s)</p>"
        )
    if bench:
        rows = [
            {
                "backend": r.get("backend", "ray_llm"),
                "concurrency": r["concurrency"],
                "bare tok/s": r["bare"]["output_throughput"],
                "ours tok/s": r["ours"]["output_throughput"],
                "ratio": r["throughput_ratio"],
                "bare TTFT ms": r["bare"]["median_ttft_ms"],
                "ours TTFT ms": r["ours"]["median_ttft_ms"],
                "TTFT diff ms": r["ttft_diff_ms"],
            }
            for r in bench["rows"]
        ]
        parts.append(
            f"<p>Benchmark (vllm bench serve, {bench['input_len']} in / {bench['output_len']} out "
            f"tokens): our endpoint against bare vllm serve on the same model.</p>"
        )
        parts.append(_table(rows, list(rows[0]) if rows else []))
    return "\n".join(parts)


def render(run_uri: str) -> str:
    from fsspec.core import url_to_fs

    from tailorlm.runs import normalize_uri

    uri = normalize_uri(run_uri).rstrip("/")
    storage, name = uri.rsplit("/", 1)
    run = RunDir(storage, name)
    fs, path = url_to_fs(run.uri)
    if not fs.exists(path):
        raise FileNotFoundError(f"report: run folder {run_uri} does not exist")
    sections = [data_section(run), tune_section(run), train_section(run), export_section(run), serve_section(run)]
    body = "\n".join(s for s in sections if s) or "<p>No finished stage in this run yet.</p>"
    style = (
        "body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
        "font-size:13px;text-align:left}img{max-width:100%;display:block;margin:1em 0}"
    )
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>tailorlm run {html.escape(name)}</title>"
        f"<style>{style}</style></head><body><h1>tailorlm run: {html.escape(name)}</h1>{body}</body></html>"
    )


def write_report(run_uri: str) -> str:
    import fsspec

    from tailorlm.runs import normalize_uri

    out = normalize_uri(run_uri).rstrip("/") + "/report.html"
    page = render(run_uri)
    with fsspec.open(out, "w") as fh:
        fh.write(page)
    return out
