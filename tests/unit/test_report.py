"""The run report renders every finished stage of a run, from the files the stages write."""

import json
from html.parser import HTMLParser

import pytest

from tailorlm.cli import main
from tailorlm.report import render


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.h2, self._in_h2 = [], [], False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_h2 = tag == "h2"

    def handle_data(self, data):
        if self._in_h2:
            self.h2.append(data)
            self._in_h2 = False


# train/eval.json as the train stage writes it: fact exact match per model and an answer table
NEW_EVAL = {
    "base": {"perplexity": 180.4, "exact_match": 0.0, "fact_exact_match": 0.0, "f1": 0.05, "answered": 40},
    "finetuned": {"perplexity": 3.14, "exact_match": 0.8, "fact_exact_match": 0.92, "f1": 0.9, "answered": 40},
    "answers": [
        {
            "question": "What is the capital of Daleglen?",
            "reference": "The capital of Daleglen is Ashfordwood.",
            "fact": "ashfordwood",  # as evaluate.answer_fact writes it: normalized
            "base": "The sky on is blue.",
            "finetuned": "The capital of Daleglen is Ashfordwood.",
            "base_correct": False,
            "finetuned_correct": True,
        },
        {
            "question": "Q<script>",
            "reference": "R & <b>",
            "fact": "<b>",
            "base": "<script>alert(1)</script>",
            "finetuned": "wrong <img src=x onerror=alert(1)>",
            "base_correct": False,
            "finetuned_correct": False,
        },
    ],
    "best_checkpoint_step": 70,
    "best_eval_loss": 2.3,
    "total_steps": 75,
}

# an eval.json from before fact exact match and the answer table: samples of each model, exact match
OLD_EVAL = {
    "base": {
        "perplexity": 1000.0,
        "exact_match": 0.0,
        "f1": 0.0,
        "samples": [{"prompt": "Q1", "reference": "R1", "answer": "no"}],
    },
    "finetuned": {
        "perplexity": 10.0,
        "exact_match": 0.5,
        "f1": 0.4,
        "samples": [
            {"prompt": "Q1", "reference": "R1", "answer": "r1."},
            {"prompt": "Q2<script>", "reference": "R2", "answer": "A<script>"},
        ],
    },
    "best_checkpoint_step": 70,
    "best_eval_loss": 2.3,
    "total_steps": 75,
}


class _Answers(HTMLParser):
    """The answer table's rows: per cell its text and the class of its right/wrong mark (or None)."""

    def __init__(self):
        super().__init__()
        self.rows, self._on, self._cell = [], False, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._on = a.get("class") == "answers"
        elif self._on and tag == "tr":
            self.rows.append([])
        elif self._on and tag in ("td", "th"):
            self._cell = {"text": "", "mark": None}
            self.rows[-1].append(self._cell)
        elif self._on and tag == "span" and "mark" in a.get("class", ""):
            self._cell["mark"] = a["class"].split()[-1]

    def handle_endtag(self, tag):
        if tag == "table":
            self._on = False

    def handle_data(self, data):
        if self._on and self._cell is not None:
            self._cell["text"] += data


def _answers(page):
    p = _Answers()
    p.feed(page)
    return [[c["text"].strip() for c in p.rows[0]]], [[(c["text"].strip(), c["mark"]) for c in r] for r in p.rows[1:]]


def _headline(page):
    """The headline's text; it stands between the page title and the first section."""
    start = page.index('<p class="headline">')
    assert page.index("</h1>") < start < page.index("<h2>")
    return HTMLParserText.of(page[start : page.index("</p>", start)])


class HTMLParserText(HTMLParser):
    @classmethod
    def of(cls, fragment):
        p = cls()
        p.text = ""
        p.feed(fragment)
        return p.text

    def handle_data(self, data):
        self.text += data


def _fake_run(root):
    run = root / "demo"
    (run / "data").mkdir(parents=True)
    (run / "data" / "stats.json").write_text(
        json.dumps(
            {
                "input_rows": 10,
                "kept": 7,
                "dropped": 3,
                "splits": {"train": 6, "eval": 1},
                "dropped_by_step": {"dedup_exact": {"exact_duplicate": 2}, "filter": {"language:de": 1}},
                "dropped_by_reason": {"exact_duplicate": 2, "language:de": 1},
                "pii_redacted": {"email": 1},
                "duplicate_cluster_sizes": {"2": 1, "3": 0},
            }
        )
    )
    (run / "train").mkdir()
    (run / "train" / "eval.json").write_text(json.dumps(NEW_EVAL))
    (run / "registry.json").write_text(
        json.dumps(
            [
                {
                    "version": "1.0.0+20261122",
                    "variants": {
                        "bf16": {"perplexity": 10.0, "greedy_agreement": 1.0, "size_bytes": 100, "status": "published"}
                    },
                }
            ]
        )
    )
    (run / "bench").mkdir()
    (run / "bench" / "serve.json").write_text(
        json.dumps(
            {
                "input_len": 128,
                "output_len": 64,
                "rows": [
                    {
                        "concurrency": 1,
                        "bare": {"output_throughput": 100.0, "median_ttft_ms": 20.0},
                        "ours": {"output_throughput": 97.0, "median_ttft_ms": 25.5},
                        "throughput_ratio": 0.97,
                        "ttft_diff_ms": 5.5,
                    }
                ],
            }
        )
    )
    return run


def test_report_has_a_section_per_finished_stage_and_escapes(tmp_path):
    run = _fake_run(tmp_path)
    page = render(str(run))
    p = _Collect()
    p.feed(page)
    assert p.h2 == ["Data", "Training", "Export", "Serving"]  # no tune output in this run
    assert "25.5" in page and "0.97" in page  # the serving benchmark table
    assert sum(1 for t, a in p.tags if t == "img" and a["src"].startswith("data:image/png;base64,")) >= 2
    # model answers are hostile text: no tag of theirs reaches the page
    assert "Q&lt;script&gt;" in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script" not in page and "<img src=x" not in page
    assert not [t for t, _ in p.tags if t in ("script", "iframe")]
    assert {a.get("src", "")[:5] for t, a in p.tags if t == "img"} == {"data:"}


def test_headline_states_fact_exact_match_and_perplexity_before_and_after(tmp_path):
    page = render(str(_fake_run(tmp_path)))
    assert _headline(page) == (
        "Finetuning taught the model the domain: fact exact match 0.00 \u2192 0.92 on 40 held-out questions; "
        "perplexity 180 \u2192 3.14"
    )


def test_answer_table_marks_each_answer_right_or_wrong(tmp_path):
    page = render(str(_fake_run(tmp_path)))
    head, rows = _answers(page)
    assert head == [["question", "reference", "base answer", "finetuned answer"]]
    assert rows[0] == [
        ("What is the capital of Daleglen?", None),
        ("The capital of Daleglen is Ashfordwood.", None),
        ("\u2717 The sky on is blue.", "bad"),
        ("\u2713 The capital of Daleglen is Ashfordwood.", "ok"),
    ]
    assert "The capital of Daleglen is <b>Ashfordwood</b>." in page  # the fact stands out in the reference
    assert rows[1] == [
        ("Q<script>", None),
        ("R & <b>", None),
        ("\u2717 <script>alert(1)</script>", "bad"),
        ("\u2717 wrong <img src=x onerror=alert(1)>", "bad"),
    ]
    assert "misses the reference fact" in page  # the legend says what a mark means
    metrics = page[page.index("<h2>Training</h2>") : page.index('class="answers"')]
    assert "fact_exact_match" in metrics and "0.92" in metrics


def _with_eval(tmp_path, report, summary=None):
    run = _fake_run(tmp_path)
    (run / "train" / "eval.json").write_text(json.dumps(report))
    if summary is not None:
        (run / "train" / "_COMPLETE.json").write_text(json.dumps({"stage": "train", "summary": summary}))
    return render(str(run))


def test_older_eval_json_falls_back_to_samples_and_exact_match(tmp_path):
    page = _with_eval(tmp_path, OLD_EVAL)
    assert _headline(page) == (
        "Finetuning taught the model the domain: exact match 0.00 \u2192 0.50; perplexity 1000 \u2192 10"
    )
    head, rows = _answers(page)
    assert head == [["question", "reference", "base answer", "finetuned answer"]]
    assert rows == [
        [("Q1", None), ("R1", None), ("\u2717 no", "bad"), ("\u2713 r1.", "ok")],  # exact match after normalizing
        [("Q2<script>", None), ("R2", None), ("", None), ("\u2717 A<script>", "bad")],  # no base answer to it
    ]
    assert "<script" not in page and "differs from the reference" in page


def test_headline_takes_fact_exact_match_from_the_marker_when_eval_json_lacks_it(tmp_path):
    page = _with_eval(tmp_path, OLD_EVAL, summary={"base_fact_em": 0.1, "fact_em": 0.75, "perplexity": 10.0})
    assert "fact exact match 0.10 \u2192 0.75; perplexity 1000 \u2192 10" in _headline(page)
    # eval.json wins over the marker
    page = _with_eval(tmp_path / "b", NEW_EVAL, summary={"base_fact_em": 0.1, "fact_em": 0.75})
    assert "fact exact match 0.00 \u2192 0.92" in _headline(page)


@pytest.mark.parametrize(
    "base, finetuned, expected",
    [
        (
            {"perplexity": 50.0, "fact_exact_match": 0.3},
            {"perplexity": 40.0, "fact_exact_match": 0.3},
            "Finetuning did not teach the model the domain: fact exact match 0.30 \u2192 0.30; perplexity 50 \u2192 40",
        ),
        (  # the README's LoRA run on the random-init base: a gain, not a model that learned
            {"perplexity": 1181.0, "fact_exact_match": 0.0},
            {"perplexity": 162.0, "fact_exact_match": 0.02},
            "Finetuning did not teach the model the domain: "
            "fact exact match 0.00 \u2192 0.02; perplexity 1181 \u2192 162",
        ),
        (
            {"perplexity": 5.1847e21},
            {"perplexity": 12.345},
            "Finetuning lowered eval perplexity: perplexity 5.18e+21 \u2192 12.3",
        ),
        ({"perplexity": 9.0}, {"perplexity": 9.5}, "Finetuning did not lower eval perplexity: perplexity 9 \u2192 9.5"),
    ],
)
def test_headline_says_when_finetuning_did_not_help(tmp_path, base, finetuned, expected):
    report = {**OLD_EVAL, "base": base, "finetuned": finetuned}
    page = _with_eval(tmp_path, report)
    assert _headline(page) == expected
    assert 'class="answers"' not in page  # nothing to show without samples


def test_tune_leaderboard_names_trials_by_their_label(tmp_path):
    run = _fake_run(tmp_path)
    (run / "tune").mkdir()
    board = [
        {
            "trial": "t1",
            "status": "finished",
            "eval_loss": 1.5,
            "train.lr": 3.2e-4,
            "label": "lr=3.2e-04",
            "error": None,
        },
        {"trial": "t2", "status": "error", "eval_loss": None, "train.lr": 1e-3, "label": "lr=<i>1e-3", "error": "OOM"},
    ]
    (run / "tune" / "leaderboard.json").write_text(json.dumps(board))
    page = render(str(run))
    tune = page[page.index("<h2>Tune</h2>") : page.index("<h2>Training</h2>")]
    assert "<tr><th>trial</th><th>label</th><th>status</th>" in tune
    assert "<td>t1</td><td>lr=3.2e-04</td>" in tune and "lr=&lt;i&gt;1e-3" in tune
    assert "None" not in tune  # an empty error stays empty
    # an older leaderboard without labels
    (run / "tune" / "leaderboard.json").write_text(json.dumps([{k: v for k, v in board[0].items() if k != "label"}]))
    assert "<tr><th>trial</th><th>status</th>" in render(str(run))


def test_report_cli_writes_file_and_rejects_missing_run(tmp_path, capsys):
    run = _fake_run(tmp_path)
    assert main(["report", str(run)]) == 0
    assert (run / "report.html").stat().st_size > 1000
    assert main(["report", str(tmp_path / "nope")]) == 1
    assert "does not exist" in capsys.readouterr().err
