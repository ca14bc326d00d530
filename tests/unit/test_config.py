"""Config: strict keys, clear errors, dotted overrides through the same validation."""

from pathlib import Path

import pytest

from tailorlm.config import ConfigError, PipelineConfig, TinyModelSpec, apply_overrides, load_config, parse_override

CONFIGS = sorted((Path(__file__).parents[2] / "jobs" / "configs").glob("*.yaml"))


def test_configs_folder_is_not_empty():
    assert len(CONFIGS) >= 2


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, PipelineConfig)
    # a shipped config must be explicit about what it runs
    assert "train" in path.read_text() and "serve" in path.read_text()


def test_defaults_validate_and_use_factory_model():
    cfg = load_config(None)
    assert isinstance(cfg.model.base, TinyModelSpec)
    assert cfg.train.global_batch_size == cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.train.num_workers


def test_unknown_key_names_the_key_and_suggests():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["train.lrr=3e-4"])
    msg = str(exc.value)
    assert "train.lrr" in msg and "did you mean 'train.lr'" in msg and "micro_batch_size" in msg


def test_unknown_section_lists_sections():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["trian.lr=1"])
    assert "'trian'" in str(exc.value) and "train" in str(exc.value) and "serve" in str(exc.value)


def test_bad_value_names_key_and_allowed_values():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["train.method=qlora"])
    assert "train.method" in str(exc.value) and "'lora' or 'full'" in str(exc.value)


def test_head_size_below_32_is_rejected():
    with pytest.raises(ConfigError, match="head size"):
        load_config(None, ["model.base.hidden_size=64", "model.base.num_heads=4"])


def test_nested_unknown_key_in_factory_spec_lists_its_fields():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["model.base.depth=3"])
    assert "model.base.depth" in str(exc.value) and "num_layers" in str(exc.value)


def test_overrides_are_typed_like_yaml():
    cfg = load_config(
        None,
        [
            "train.lr=3e-4",
            "train.lora.r=8",
            "data.filters.languages=[en]",
            "train.use_gpu=true",
            "model.base=Qwen/Qwen2.5-0.5B",
        ],
    )
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.lora.r == 8
    assert cfg.data.filters.languages == ["en"]
    assert cfg.train.use_gpu is True
    assert cfg.model.base == "Qwen/Qwen2.5-0.5B"


def test_override_changes_yaml_value(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 0.1\n  epochs: 2\n")
    cfg = load_config(p, ["train.lr=0.2"])
    assert cfg.train.lr == 0.2 and cfg.train.epochs == 2


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="dotted.key=value"):
        parse_override("train.lr")
    with pytest.raises(ConfigError, match="empty key"):
        parse_override("train..lr=1")
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"train": {"lr": 1}}, ["train.lr.x=1"])


def test_dict_overrides_as_tune_applies_them():
    raw = apply_overrides({}, {"train.lr": 1e-3, "train.lora.r": 32})
    assert raw == {"train": {"lr": 1e-3, "lora": {"r": 32}}}
    assert load_config(None, {"train.lora.r": 32}).train.lora.r == 32


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="offload_params needs stage: 3"):
        load_config(None, ["train.deepspeed.offload_params=true", "train.deepspeed.stage=2"])
    with pytest.raises(ConfigError, match="exceeds num_perm"):
        load_config(None, ["data.dedup.near.bands=32", "data.dedup.near.rows=8"])
    with pytest.raises(ConfigError, match="direct_ingress: true needs serve.backend=vllm and serve.replicas.max=1"):
        load_config(None, ["serve.direct_ingress=true", "serve.replicas.max=2"])


def test_direct_ingress_default_follows_backend_and_replicas():
    assert load_config(None).serve.uses_direct_ingress()
    assert not load_config(None, ["serve.replicas.max=3"]).serve.uses_direct_ingress()
    assert not load_config(None, ["serve.backend=ray_llm"]).serve.uses_direct_ingress()
    assert not load_config(None, ["serve.direct_ingress=false"]).serve.uses_direct_ingress()


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_section_hash_tracks_only_named_sections():
    a = load_config(None)
    b = load_config(None, ["train.lr=0.5"])
    assert a.section_hash("data") == b.section_hash("data")
    assert a.section_hash("train") != b.section_hash("train")


def test_config_module_does_not_import_heavy_libraries():
    import subprocess
    import sys

    code = (
        "import sys, tailorlm.config, tailorlm.cli; "
        "print(any(m in sys.modules for m in ('torch','deepspeed','vllm','ray')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_execution_only_fields_leave_the_stage_hash_alone():
    """data.in_process_max_mb says where the data stage runs, not what it writes: changing it must
    not make a finished run's data, tune, train and export stages rerun."""
    from tailorlm.config import EXECUTION_ONLY

    base = load_config(None, [])
    assert base.section_hash("model", "data") == load_config(None, ["data.in_process_max_mb=0"]).section_hash(
        "model", "data"
    )
    assert base.section_hash("data") != load_config(None, ["data.eval_fraction=0.2"]).section_hash("data")
    for section, field in EXECUTION_ONLY:  # each names a real field
        assert field in type(getattr(base, section)).model_fields


def test_in_process_max_mb_zero_means_ray_data_even_for_an_empty_file():
    from tailorlm.config import DataConfig
    from tailorlm.data.stage import in_process

    empty = [{"bytes": 0}]
    assert not in_process(empty, DataConfig(in_process_max_mb=0))
    assert in_process(empty, DataConfig()) and not in_process([{"bytes": 9e6}], DataConfig())
