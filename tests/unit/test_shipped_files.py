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


def test_kuberay_example_runs_our_entrypoint_and_serve_app():
    import shlex

    from tailorlm.config import load_config

    job, service = yaml.safe_load_all((ROOT / "serve" / "kuberay.yaml").read_text())
    assert (job["kind"], service["kind"]) == ("RayJob", "RayService")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[1].endswith("jobs/pipeline.py") and (ROOT / "jobs" / "pipeline.py").exists()
    config = argv[argv.index("--config") + 1].replace("/home/ray/tailorlm/", "")
    load_config(str(ROOT / config), argv[argv.index("--config") + 2 :])  # the overrides validate
    app = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]
    ours = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())["applications"][0]
    assert app["import_path"] == ours["import_path"]
    load_config(str(ROOT / app["args"]["config"].replace("/home/ray/tailorlm/", "")), app["args"]["overrides"])
    for spec in (job["spec"]["rayClusterSpec"], service["spec"]["rayClusterConfig"]):
        gpu = spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert "nvidia.com/gpu" in gpu
