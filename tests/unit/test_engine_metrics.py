"""serving.engine_metrics: a gauge skips only repeats of its last value (and not for long), and
labelled children are made once."""

import pytest

pytest.importorskip("vllm")

from tailorlm.serving import engine_metrics  # noqa: E402


class Recorder:
    def __init__(self):
        self.calls = []

    def set(self, value, tags):
        self.calls.append((value, dict(tags)))


def test_gauge_skips_repeats_until_refresh(monkeypatch):
    gauge = engine_metrics.SkipRepeatGauge("tailorlm_test_gauge", "test", labelnames=["model_name"])
    child = gauge.labels("tiny")
    assert gauge.labels("tiny") is child and gauge.labels("other") is not child
    child.metric = Recorder()
    for value in (1, 1, 1, 2, 2, 1):
        child.set(value)
    assert [v for v, _ in child.metric.calls] == [1, 2, 1]
    assert child.metric.calls[0][1]["model_name"] == "tiny"
    monkeypatch.setattr(engine_metrics, "GAUGE_REFRESH_S", 0.0)  # past the refresh period: sent again
    child.set(1)
    assert [v for v, _ in child.metric.calls] == [1, 2, 1, 1]


def test_counter_children_are_made_once():
    counter = engine_metrics.LabelOnceCounter("tailorlm_test_counter", "test", labelnames=["model_name", "source"])
    a = counter.labels("tiny", "device")
    assert counter.labels("tiny", "device") is a
    assert counter.labels("tiny", "connector") is not a
    assert a._tags["model_name"] == "tiny" and a._tags["source"] == "device"
    with pytest.raises(ValueError):
        a.labels("x", "y")  # a child is labelled already, as with vLLM's own wrappers
