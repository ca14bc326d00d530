"""The run report renders every finished stage of a run, from the files the stages write."""

import json
from html.parser import HTMLParser

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
    (run / "train" / "eval.json").write_text(
        json.dumps(
            {
                "base": {"perplexity": 1000.0, "f1": 0.0},
                "finetuned": {
                    "perplexity": 10.0,
                    "f1": 0.4,
                    "samples": [{"prompt": "Q<script>", "reference": "R", "answer": "A"}],
                },
                "best_checkpoint_step": 70,
                "best_eval_loss": 2.3,
                "total_steps": 75,
            }
        )
    )
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
    assert "Q&lt;script&gt;" in page and "<script>" not in page


def test_report_cli_writes_file_and_rejects_missing_run(tmp_path, capsys):
    run = _fake_run(tmp_path)
    assert main(["report", str(run)]) == 0
    assert (run / "report.html").stat().st_size > 1000
    assert main(["report", str(tmp_path / "nope")]) == 1
    assert "does not exist" in capsys.readouterr().err
