"""`tailorlm promote` / `tailorlm rollback`: which registered version the endpoint serves.

    tailorlm promote jobs/configs/tiny_cpu.yaml --to 1.1.0
    tailorlm rollback jobs/configs/tiny_cpu.yaml --address auto     # and switch the running endpoint

The registry records the choice (export/registry.promote, rollback). Where the endpoint runs on the
cluster this command reaches (--address / RAY_ADDRESS), its Serve application is updated in
place to the chosen version's variants: Ray Serve starts the new replica, moves traffic to it
once it is ready and lets the old one finish what it is answering, so no request in flight is
dropped. That needs Serve's proxy in front (serve.direct_ingress=false): under direct ingress the
one replica answers on its own port, which its successor cannot take over while it drains.
"""

from __future__ import annotations

from tailorlm.config import PipelineConfig
from tailorlm.runs import RunDir


def models_of(cfg: PipelineConfig, entry: dict) -> dict[str, str]:
    """hosted model id -> URI of that version's variant (serve.variants), as serving/models.py does."""
    out = {}
    for name, variant in zip(cfg.serve.hosted_ids(), cfg.serve.variants):
        v = entry["variants"].get(variant)
        if not v or v["status"] == "refused":
            raise ValueError(f"serve.variants: {variant!r} is not published in version {entry['version']}")
        out[name] = v["uri"]
    return out


def endpoint_running() -> bool:
    import ray

    if not ray.is_initialized():
        return False
    from ray import serve

    from tailorlm.serving.stage import APP_NAME

    try:
        return APP_NAME in serve.status().applications
    except Exception:  # no Serve controller on this cluster
        return False


def switch(cfg: PipelineConfig, entry: dict) -> str:
    """Update the running endpoint (if this process reaches one) to `entry`'s variants."""
    from ray import serve

    from tailorlm.serving.app import build_app
    from tailorlm.serving.stage import APP_NAME

    if not endpoint_running():
        return f"no endpoint runs on this Ray cluster; the next `tailorlm serve` serves {entry['version']}"
    if cfg.serve.uses_direct_ingress():
        raise ValueError(
            "the endpoint runs with direct ingress (its one replica answers on serve.port itself), so a "
            "switch in place would drop requests: restart it with `tailorlm serve` (it serves the promoted "
            "version), or run it with serve.direct_ingress=false"
        )
    serve.run(build_app(cfg, models_of(cfg, entry)), name=APP_NAME, route_prefix="/", blocking=False)
    return f"endpoint switching to {entry['version']} (Ray Serve replaces the replica; requests in flight finish)"


def promote_version(cfg: PipelineConfig, version: str) -> str:
    from tailorlm.export.registry import promote

    entry = promote(RunDir.from_config(cfg), version)
    return f"promoted {entry['version']}; " + switch(cfg, entry)


def rollback_version(cfg: PipelineConfig) -> str:
    from tailorlm.export.registry import rollback

    entry = rollback(RunDir.from_config(cfg))
    return f"rolled back to {entry['version']}; " + switch(cfg, entry)
