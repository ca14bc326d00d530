"""The tiny-model factory: tokenizer, chat template, HF format with safetensors, one loading path."""

from pathlib import Path

import pytest

from tailorlm.config import load_config
from tailorlm.models import load_model, load_tokenizer, resolve_base


def test_factory_model_saved_in_hf_format(tiny_model_path):
    files = {p.name for p in Path(tiny_model_path).iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files)


def test_factory_model_loads_and_generates(tiny_model_path):
    import torch

    tok = load_tokenizer(tiny_model_path)
    model = load_model(tiny_model_path)
    head = model.config.hidden_size // model.config.num_attention_heads
    assert head >= 32
    msgs = [{"role": "user", "content": "What is the capital of Vorlan?"}]
    prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n")
    enc = tok(prompt, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == enc["input_ids"].shape[1] + 5 or int(out[0, -1]) in model.generation_config.eos_token_id
    # the tokenizer round-trips English and Chinese text (byte-level BPE loses nothing)
    for text in ["The capital of Vorlan is Kathimer.", "泽菲尔星表中的一颗行星"]:
        assert tok.decode(tok(text)["input_ids"]) == text
    with torch.no_grad():
        loss = model(**enc, labels=enc["input_ids"]).loss
    assert torch.isfinite(loss)


def test_same_spec_reuses_cache_and_different_spec_differs(tiny_model_path):
    cfg = load_config(None)
    assert resolve_base(cfg.model) == tiny_model_path
    other = resolve_base(load_config(None, ["model.base.factory=qwen2", "model.base.num_layers=1"]).model)
    assert other != tiny_model_path
    assert load_model(other).config.model_type == "qwen2"


def test_local_folder_and_hub_id_resolve(tiny_model_path):
    assert resolve_base(load_config(None, [f"model.base={tiny_model_path}"]).model) == str(
        Path(tiny_model_path).resolve()
    )
    assert resolve_base(load_config(None, ["model.base=Qwen/Qwen2.5-0.5B"]).model) == "Qwen/Qwen2.5-0.5B"
    with pytest.raises(FileNotFoundError, match="model.base"):
        resolve_base(load_config(None, ["model.base=./no/such/model"]).model)


def test_skip_sklearn_import_keeps_sklearn_out_of_a_training_process(tiny_model_path):
    """transformers' model classes import sklearn.metrics whenever it is installed (0.9 s of every
    trial and Train worker start); skip_sklearn_import stops that. Fails when a transformers upgrade
    moves the check, so the saving is not silently lost."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from tailorlm.models import skip_sklearn_import, load_model\n"
        "skip_sklearn_import()\n"
        f"load_model({str(tiny_model_path)!r})\n"
        "print('sklearn' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"
