"""The model folders the endpoint hosts: the newest registered export's variants (serve.variants),
copied into the local cache when they live in remote storage (vLLM loads local folders).
Shared by the serve stage and `serve deploy`'s application builder (serving/app.py).
"""

from __future__ import annotations

from tailorlm.config import PipelineConfig
from tailorlm.runs import RunDir


def local_copy(uri: str) -> str:
    """vLLM loads from a local folder: remote exports are copied into the local cache once."""
    from fsspec.core import url_to_fs

    from tailorlm.models import cache_root
    from tailorlm.runs import local_path

    if local_path(uri):
        return local_path(uri)
    fs, path = url_to_fs(uri)
    dest = cache_root() / "served" / path.strip("/").replace("/", "_")
    if not dest.exists():
        fs.get(path, str(dest), recursive=True)
    return str(dest)


def resolve_models(cfg: PipelineConfig) -> dict[str, str]:
    from tailorlm.export.registry import latest_variant

    run_dir = RunDir.from_config(cfg)
    out = {}
    for name, variant in zip(cfg.serve.hosted_ids(), cfg.serve.variants):
        uri, _ = latest_variant(run_dir, variant)
        out[name] = local_copy(uri)
    return out
