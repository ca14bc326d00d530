"""`tailorlm report RUN_DIR`: one static HTML page about a pipeline run, plots embedded as images.

    tailorlm report runs/demo              # writes runs/demo/report.html

The page opens with the run's headline: fact exact match and perplexity, base -> finetuned, on the
held-out questions (train/eval.json). Sections appear for the stages that finished: the data funnel
(rows kept and dropped by reason) and dedup cluster sizes, training and eval curves with the
before/after table and base vs finetuned answers marked right or wrong, the tune leaderboard (trials
labelled by their sampled values) and trial curves, export variants with quality and size, and the
serving check. All text from the run, model answers included, is escaped.
"""

from __future__ import annotations

import base64
import html
import io
import json
from typing import Any

from tailorlm.runs import RunDir

RIGHT = '<span class="mark ok" title="{}">&#10003;</span>'
WRONG = '<span class="mark bad" title="{}">&#10007;</span>'


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
        return f"{v:.4g}" if isinstance(v, float) else "" if v is None else html.escape(str(v))

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


def _em(v: Any) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _ppl(v: Any) -> str:
    return "n/a" if v is None else f"{v:.0f}" if 100 <= v < 1e5 else f"{v:.3g}"


LEARNED_EM = 0.5  # the headline says the model learned the domain from this exact match on


def headline(run: RunDir) -> str:
    """What the finetuning did, in one line: fact exact match and perplexity, base -> finetuned."""
    report = _read_json(run, "train/eval.json")
    if not report:
        return ""
    b, a = report.get("base") or {}, report.get("finetuned") or {}
    summary = (run.stage("train").marker() or {}).get("summary") or {}
    if a.get("fact_exact_match") is not None:
        em = ("fact exact match", b.get("fact_exact_match"), a["fact_exact_match"])
    elif summary.get("fact_em") is not None:  # an eval.json without it, a marker with it
        em = ("fact exact match", summary.get("base_fact_em"), summary["fact_em"])
    elif a.get("exact_match") is not None:  # an older eval.json: exact match of the whole reply
        em = ("exact match", b.get("exact_match"), a["exact_match"])
    else:
        em = None
    ppl = f"perplexity {_ppl(b.get('perplexity'))} \u2192 {_ppl(a.get('perplexity'))}"
    if em is None:  # no answers scored (text rows): perplexity alone
        lower = None not in (b.get("perplexity"), a.get("perplexity")) and a["perplexity"] < b["perplexity"]
        claim, text = f"Finetuning {'lowered' if lower else 'did not lower'} eval perplexity", ppl
    else:
        name, before, after = em
        n = a.get("fact_scored") if name.startswith("fact") else None  # the fact score's own denominator
        n = n or a.get("answered")
        on = f" on {n} held-out questions" if n else ""
        taught = "After finetuning" if before is None else "Finetuning taught the model the domain"
        # "taught" only for a model that answers most held-out questions right, not for any gain
        # (a LoRA run on the random-init demo base goes 0.00 -> 0.02)
        learned = after >= LEARNED_EM and (before is None or after > before)
        claim = taught if learned else "Finetuning did not teach the model the domain"
        if before is None and not learned:
            claim = "After finetuning the model still misses most held-out questions"
        text = f"{name} {_em(before)} \u2192 {_em(after)}{on}; {ppl}"
    return f'<p class="headline"><b>{html.escape(claim)}:</b> {html.escape(text)}</p>'


def _answer_rows(report: dict[str, Any]) -> tuple[list[dict[str, Any]], tuple[str, str]]:
    """(rows of question, reference, fact, base, finetuned, base_correct, finetuned_correct; what a
    right and a wrong mark mean). An older eval.json has no "answers": its samples, marked by exact match."""
    if report.get("answers"):
        return report["answers"], ("states the reference fact", "misses the reference fact")
    from tailorlm.train.evaluate import normalize_answer

    base = {s.get("prompt"): s.get("answer") for s in report["base"].get("samples") or []}

    def same(x: Any, ref: Any) -> bool | None:
        return None if x is None else normalize_answer(str(x)) == normalize_answer(str(ref))

    rows = [
        {"question": s.get("prompt"), "reference": s.get("reference", ""), "finetuned": s.get("answer")}
        | {"base": base.get(s.get("prompt"))}
        for s in report["finetuned"].get("samples") or []
    ]
    for r in rows:
        r.update(base_correct=same(r["base"], r["reference"]), finetuned_correct=same(r["finetuned"], r["reference"]))
    return rows, ("matches the reference", "differs from the reference")


def answer_table(report: dict[str, Any]) -> str:
    """Question, reference (its fact in bold), base and finetuned answers, each marked right or wrong."""
    rows, meaning = _answer_rows(report)
    if not rows:
        return ""

    def reference(r: dict[str, Any]) -> str:
        # the fact is normalized (lowercase, no punctuation): find it in the reference ignoring case
        ref, fact = str(r.get("reference") or ""), str(r.get("fact") or "")
        at = ref.lower().find(fact.lower()) if fact else -1
        if at < 0:
            return html.escape(ref)
        head, found, tail = ref[:at], ref[at : at + len(fact)], ref[at + len(fact) :]
        return html.escape(head) + f"<b>{html.escape(found)}</b>" + html.escape(tail)

    def answer(text: Any, correct: bool | None) -> str:
        if text is None:
            return "<td></td>"
        if correct is None:
            return f"<td>{html.escape(str(text))}</td>"
        mark = RIGHT.format(meaning[0]) if correct else WRONG.format(meaning[1])
        return f'<td class="{"right" if correct else "wrong"}">{mark} {html.escape(str(text))}</td>'

    head = "".join(f"<th>{c}</th>" for c in ("question", "reference", "base answer", "finetuned answer"))
    body = "".join(
        f"<tr><td>{html.escape(str(r.get('question') or ''))}</td><td>{reference(r)}</td>"
        f"{answer(r.get('base'), r.get('base_correct'))}{answer(r.get('finetuned'), r.get('finetuned_correct'))}</tr>"
        for r in rows
    )
    legend = f"<p>Answers to held-out questions: &#10003; {meaning[0]}, &#10007; {meaning[1]}.</p>"
    return f'{legend}<table class="answers"><tr>{head}</tr>{body}</table>'


def train_section(run: RunDir) -> str:
    report = _read_json(run, "train/eval.json")
    if not report:
        return ""
    metrics = ("perplexity", "fact_exact_match", "exact_match", "f1", "rouge_l")
    keys = [k for k in metrics if k in report["finetuned"]]
    rows = [{"metric": k, "base": report["base"].get(k, ""), "finetuned": report["finetuned"][k]} for k in keys]
    return "\n".join(
        [
            f"<h2>Training</h2><p>best checkpoint at step {report['best_checkpoint_step']} of "
            f"{report['total_steps']}, eval loss {report['best_eval_loss']:.4f}.</p>",
            _img_from_file(run, "train/loss.png"),
            _table(rows, ["metric", "base", "finetuned"]),
            answer_table(report),
        ]
    )


def tune_section(run: RunDir) -> str:
    board = _read_json(run, "tune/leaderboard.json")
    if not board:
        return ""
    # "label" names a trial by its sampled values (lr=3.2e-04 warmup_steps=4); older leaderboards lack it
    first = ["trial", "label"] if "label" in board[0] else ["trial"]
    cols = [c for c in board[0] if c not in first]
    return "\n".join(["<h2>Tune</h2>", _table(board, [*first, *cols]), _img_from_file(run, "tune/trials.png")])


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


def monitor_section(run: RunDir) -> str:
    """The drift checks over time (`tailorlm monitor`'s history) and the last check's detail."""
    from tailorlm.monitor.stage import read_history

    history = read_history(run)
    if not history:
        return ""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    last = history[-1]
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(range(1, len(history) + 1), [h["kl"] for h in history], "o-", label="unigram KL to training")
    ax.plot(range(1, len(history) + 1), [h["kl_excess"] for h in history], "s-", label="above the noise floor")
    alerts = [i + 1 for i, h in enumerate(history) if h["alert"]]
    ax.plot(alerts, [history[i - 1]["kl_excess"] for i in alerts], "rx", ms=10, label="alert")
    ax.set_xlabel("check")
    ax.set_ylabel("nats")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    word = "<b>drift alert</b>" if last["alert"] else "no drift"
    return (
        f"<h2>Monitoring</h2><p>{len(history)} drift check(s) of captured traffic; the last "
        f"({html.escape(last['checked_at'])}, {last['rows']} requests): {word}, unigram KL {last['kl']:.3f}, "
        f"{last['kl_excess']:.3f} above a same-shape training sample's.</p>" + _img_from_figure(fig)
    )


def render(run_uri: str) -> str:
    from fsspec.core import url_to_fs

    from tailorlm.runs import normalize_uri

    uri = normalize_uri(run_uri).rstrip("/")
    storage, name = uri.rsplit("/", 1)
    run = RunDir(storage, name)
    fs, path = url_to_fs(run.uri)
    if not fs.exists(path):
        raise FileNotFoundError(f"report: run folder {run_uri} does not exist")
    sections = [
        data_section(run),
        tune_section(run),
        train_section(run),
        export_section(run),
        serve_section(run),
        monitor_section(run),
    ]
    body = "\n".join(s for s in [headline(run), *sections] if s) or "<p>No finished stage in this run yet.</p>"
    style = (
        "body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
        "font-size:13px;text-align:left;vertical-align:top}img{max-width:100%;display:block;margin:1em 0}"
        ".headline{font-size:1.15em;padding:.6em 1em;background:#eef5ff;border-left:4px solid #0969da}"
        ".mark{font-weight:bold;margin-right:.3em}.ok{color:#1a7f37}.bad{color:#c62828}"
        "td.right{background:#effaf0}td.wrong{background:#fdf0f0}"
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
