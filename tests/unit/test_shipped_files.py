"""The files users deploy with: cluster launcher, Serve deploy config, job entrypoints."""

from pathlib import Path

import yaml

ROOT = Path(__file__).parents[2]


def test_layout_rules():
    assert not (ROOT / "platform" / "__init__.py").exists()  # would shadow the stdlib platform module
    for name in ("pyproject.toml", "README.md", "cluster.yaml", "jobs", "serve", "tests"):
        assert (ROOT / name).exists(), name


def test_cluster_yaml_has_cpu_head_and_gpu_workers_with_gpu_extra():
    c = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    types = c["available_node_types"]
    assert c["head_node_type"] in types and "gpu_worker" in types
    assert any("[gpu]" in cmd for cmd in c["setup_commands"])


def test_serve_config_points_into_the_installed_package():
    import importlib

    c = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    app = c["applications"][0]
    module, func = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), func))
    assert (ROOT / app["args"]["config"]).exists()


def test_every_stage_has_a_job_entrypoint():
    for stage in ("pipeline", "data", "tune", "train", "export", "serve"):
        text = (ROOT / "jobs" / f"{stage}.py").read_text()
        assert f"python jobs/{stage}.py" in text and f'entry("{stage}")' in text
