"""Tune's search space: parsed from the YAML, checked through the same override validation."""

import pytest

from tailorlm.config import ConfigError, load_config


def test_search_space_shapes_are_validated():
    with pytest.raises(ConfigError, match="expected one of"):
        load_config(None, ["tune.search_space={train.lr: {normal: [0, 1]}}"])
    with pytest.raises(ConfigError, match=r"expected \[low, high\]"):
        load_config(None, ["tune.search_space={train.lr: {loguniform: [0.1]}}"])
    with pytest.raises(ConfigError, match="grid needs"):
        load_config(None, ["tune.searcher=grid", "tune.search_space={train.lr: {uniform: [0.1, 0.2]}}"])


def test_bad_keys_and_values_fail_before_any_trial():
    from tailorlm.tune.stage import check_space

    with pytest.raises(ConfigError, match="train.lrr"):
        check_space(load_config(None, ["tune.search_space={train.lrr: {choice: [0.1]}}"]))
    with pytest.raises(ConfigError, match="train.lora.r"):
        check_space(load_config(None, ["tune.search_space={train.lora.r: {choice: [8, 0]}}"]))
    check_space(
        load_config(
            None, ["tune.search_space={train.lr: {loguniform: [1.0e-5, 1.0e-3]}, train.lora.r: {choice: [8, 16]}}"]
        )
    )


def test_space_maps_to_tune_domains():
    from ray import tune

    from tailorlm.tune.stage import search_space, trial_config

    cfg = load_config(None, ["tune.searcher=grid", "tune.search_space={train.lora.r: {choice: [8, 16]}}"])
    assert search_space(cfg) == {"train.lora.r": tune.grid_search([8, 16])}
    cfg = load_config(
        None, ["tune.search_space={train.lr: {loguniform: [1.0e-5, 1.0e-3]}, train.epochs: {randint: [1, 3]}}"]
    )
    space = search_space(cfg)
    assert space["train.lr"].lower == 1e-5 and space["train.epochs"].upper == 4
    assert trial_config(cfg.to_dict(), {"train.lr": 3e-4}).train.lr == 3e-4


def test_trials_are_labelled_by_their_sampled_values():
    from types import SimpleNamespace

    from tailorlm.tune.results import compact, trial_label, trial_labels

    keys = ["train.lr", "train.warmup_steps"]
    assert trial_label({"train.lr": 0.00032, "train.warmup_steps": 4}, keys) == "lr=3.2e-04 warmup_steps=4"
    assert compact(0.1) == "0.1" and compact(3.0) == "3" and compact(1.5e5) == "1.5e+05" and compact(12345) == "12345"
    assert compact(True) == "True" and compact("cosine") == "cosine" and compact(0.0) == "0"
    # a last component two keys share keeps its full key
    assert trial_label({"train.lora.r": 8, "x.r": 2}, ["train.lora.r", "x.r"]) == "train.lora.r=8 x.r=2"
    same = [SimpleNamespace(config={"train.lr": 0.001}) for _ in range(2)]
    assert trial_labels(same + [SimpleNamespace(config={"train.lr": 0.002})], ["train.lr"]) == [
        "lr=1.0e-03 #1",
        "lr=1.0e-03 #2",
        "lr=2.0e-03",
    ]


def test_light_tokenizer_encodes_what_load_tokenizer_encodes(tiny_model_path):
    """A sweep's prepare loads the factory model's tokenizer without AutoTokenizer (formats.py): the
    same class, special tokens, template, and the same SFT and text token ids and labels."""
    import json

    import numpy as np
    import pandas as pd

    from tailorlm.models import load_tokenizer
    from tailorlm.train.formats import Tokenize, load_tokenizer_light

    light, ref = load_tokenizer_light(tiny_model_path), load_tokenizer(tiny_model_path)
    assert type(light) is type(ref) and light.chat_template == ref.chat_template
    assert (light.pad_token_id, light.eos_token_id, len(light)) == (ref.pad_token_id, ref.eos_token_id, len(ref))
    chat = [{"role": "user", "content": "How many moons has Brookwood?"}, {"role": "assistant", "content": "Six."}]
    rows = pd.DataFrame(
        {"text": ["Brookwood has six moons.", "x"], "messages": [None, json.dumps(chat)]},
    )
    new = Tokenize(tiny_model_path, "auto", 64, False)
    old = Tokenize(tiny_model_path, "auto", 64, False)
    old.tok = ref
    a, b = new(rows), old(rows)
    assert len(a) == 2
    for col in ("input_ids", "labels"):
        assert all(np.array_equal(x, y) for x, y in zip(a[col], b[col]))


def test_fast_path_is_refused_when_any_sampled_value_needs_real_ranks():
    """The base config may fit one process while a sampled value does not (review finding)."""
    from tailorlm.tune.fast import fast_path_reason

    base = ["tune.enabled=true", "train.use_gpu=true", "train.num_workers=1"]
    assert fast_path_reason(load_config(None, base + ["tune.search_space={train.lr: {grid: [0.001]}}"])) is None
    cfg = load_config(None, base + ["tune.search_space={train.num_workers: {choice: [1, 4]}}"])
    assert "num_workers" in fast_path_reason(cfg)
