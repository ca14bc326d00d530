"""The models the endpoint hosts: the newest registered export's variants (serve.variants), as
storage URIs. The replica copies remote ones into its own node's cache (`models.local_model`):
on a cluster it may run on any node, and no node but the driver's holds the driver's disk.
Shared by the serve stage and `serve deploy`'s application builder (serving/app.py).
"""

from __future__ import annotations

from tailorlm.config import PipelineConfig
from tailorlm.runs import RunDir


def resolve_models(cfg: PipelineConfig) -> dict[str, str]:
    from tailorlm.export.registry import entry_of, latest_variant

    run_dir = RunDir.from_config(cfg)
    out = {}
    for name, variant in zip(cfg.serve.hosted_ids(), cfg.serve.variants):
        uri, _ = latest_variant(run_dir, variant)
        out[name] = uri
    if cfg.serve.shadow.version:  # the candidate, in its first listed variant
        v = entry_of(run_dir, cfg.serve.shadow.version)["variants"].get(cfg.serve.variants[0])
        if not v or v["status"] == "refused":
            raise ValueError(
                f"serve.shadow.version: {cfg.serve.variants[0]} of {cfg.serve.shadow.version} is not published"
            )
        out[cfg.serve.shadow_id()] = v["uri"]
    return out


def guard_settings(cfg: PipelineConfig):
    """The guard's settings for this run's endpoint: serve.* plus where serve.capture writes
    (<run>/capture), what it redacts (data.pii.kinds: always, whether or not the data stage
    redacts), and the registry version served (the promoted one, else the newest), which every
    response names in its x-tailorlm-version header and capture records."""
    from tailorlm.export.registry import served_entry
    from tailorlm.serving.capture import CAPTURE
    from tailorlm.serving.security import GuardSettings

    run_dir = RunDir.from_config(cfg)
    try:
        version = served_entry(run_dir)["version"]
    except FileNotFoundError:  # models given by hand (tests, the serving benchmark): no registry
        version = None
    shadow = cfg.serve.shadow.version
    if shadow:
        from tailorlm.export.registry import entry_of

        shadow = entry_of(run_dir, shadow)["version"]
    return GuardSettings.from_config(
        cfg.serve,
        capture_uri=f"{run_dir.uri}/{CAPTURE}",
        pii_kinds=list(cfg.data.pii.kinds),
        version=version,
        shadow_version=shadow,
    )
