"""vLLM's engine metrics (tokens, latencies, queue, KV cache) on Ray's metrics endpoint, at a
smaller cost per engine step than vLLM's own `RayPrometheusStatLogger`.

vLLM records its stats on every engine step, in the process that streams tokens to clients.
Through Ray metrics each gauge set costs ~3 us (prometheus_client: ~1 us), and vLLM sets eight
gauges and relabels a counter (copying the metric and rebuilding its tags) on every step, mostly
to the same values. With a ~2 ms decode step on CPU that was ~60 us per streamed token, a tenth
of the replica's CPU (py-spy, bench/serve.py). Here a gauge skips a set that repeats its last value
within `GAUGE_REFRESH_S` (Ray's exporter forgets gauge values once collected, so an unchanged value
is still sent again that often), and labelled children are made once. Counters and histograms
record every event, as before.
"""

from __future__ import annotations

import time

from vllm.v1.metrics.ray_wrappers import (
    RayCounterWrapper,
    RayGaugeWrapper,
    RayHistogramWrapper,
    RayPrometheusStatLogger,
)

GAUGE_REFRESH_S = 1.0  # well under Ray's metric export interval (metrics_report_interval_ms, 10 s)


class _LabelsOnce:
    """labels() returns one child per label set, made on first use."""

    def labels(self, *labels, **labelskwargs):
        children = self.__dict__.setdefault("_children", {})
        key = (labels, tuple(sorted(labelskwargs.items())))
        child = children.get(key)
        if child is None:
            child = children[key] = super().labels(*labels, **labelskwargs)
            child._children = {}  # a child is labelled already; it must not share its parent's cache
        return child


class SkipRepeatGauge(_LabelsOnce, RayGaugeWrapper):
    _last: float | None = None
    _last_at: float = 0.0

    def set(self, value):
        now = time.monotonic()
        if value == self._last and now - self._last_at < GAUGE_REFRESH_S:
            return None
        self._last, self._last_at = value, now
        return super().set(value)


class LabelOnceCounter(_LabelsOnce, RayCounterWrapper):
    pass


class LabelOnceHistogram(_LabelsOnce, RayHistogramWrapper):
    pass


class EngineStatLogger(RayPrometheusStatLogger):
    """vLLM's RayPrometheusStatLogger (same metric names and tags) with the cheaper wrappers."""

    _gauge_cls = SkipRepeatGauge
    _counter_cls = LabelOnceCounter
    _histogram_cls = LabelOnceHistogram
