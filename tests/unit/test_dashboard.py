"""The shipped Grafana dashboard reads only metrics we export (metric_names), with their suffixes."""

import json
import re
from pathlib import Path

from tailorlm.metric_names import exported_names

DASHBOARD = Path(__file__).parents[2] / "serve" / "grafana_dashboard.json"


def dashboard_metrics() -> set[str]:
    exprs = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]
    assert exprs
    return {m for e in exprs for m in re.findall(r"\b(ray_(?:tailorlm|vllm)_\w+)\b", e)}


def test_every_dashboard_query_names_a_metric_we_export():
    ours = {m for m in dashboard_metrics() if m.startswith("ray_tailorlm_")}
    assert ours and ours <= exported_names(), ours - exported_names()
    # and every metric we export has a panel
    from tailorlm.metric_names import KINDS

    assert {n for n in KINDS if not any(m.startswith("ray_" + n) for m in ours)} == set()
