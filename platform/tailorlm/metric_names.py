"""Every Prometheus metric tailorlm exports, named once: the code that records them, the shipped
Grafana dashboard (serve/grafana_dashboard.json) and the tests read these. Ray's exporter puts its
namespace in front (`ray_`) and the type's suffixes after (_total for counters; _bucket, _sum,
_count for histograms): `tailorlm_requests` is scraped as `ray_tailorlm_requests_total`."""

REQUESTS = "tailorlm_requests"  # counter {route, status}: route is an allow-listed route's name
ERRORS = "tailorlm_errors"  # counter {route, status}, 4xx/5xx only
LATENCY = "tailorlm_request_latency_s"  # histogram {route}
CAPTURE_ROWS = "tailorlm_capture_rows"  # counter {kind: requests|feedback|shadow, outcome: written|dropped_*}
DRIFT_KL = "tailorlm_drift_kl"  # gauge: the last monitor check's unigram KL (nats)
DRIFT_KL_EXCESS = "tailorlm_drift_kl_excess"  # gauge: that KL above the no-drift noise floor
DRIFT_ALERT = "tailorlm_drift_alert"  # gauge: 1 when the last check alerted
QUALITY = "tailorlm_quality_fact_em"  # gauge: the live endpoint's fact exact match (monitor.quality)
QUALITY_ALERT = "tailorlm_quality_alert"  # gauge: 1 when quality decayed for monitor.quality_checks checks

KINDS = {
    REQUESTS: "counter",
    ERRORS: "counter",
    LATENCY: "histogram",
    CAPTURE_ROWS: "counter",
    DRIFT_KL: "gauge",
    DRIFT_KL_EXCESS: "gauge",
    DRIFT_ALERT: "gauge",
    QUALITY: "gauge",
    QUALITY_ALERT: "gauge",
}
PREFIX = "ray_"  # Ray's Prometheus namespace (ray._private.metrics_agent)
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exported_names() -> set[str]:
    """The series names Prometheus sees for our metrics."""
    return {PREFIX + name + s for name, kind in KINDS.items() for s in SUFFIXES[kind]}
