"""Every Mixture-of-Experts family the factory builds serves on vLLM's CPU backend, and vLLM's
greedy output matches transformers' on a (briefly) trained model: the config keys vLLM needs are
in the saved folder (families.patch_for_vllm), the MLA latent is the one CPU MLA runs."""

import json
import os
import subprocess
import sys

import pytest

from tailorlm.config import TinyModelSpec
from tailorlm.families import FAMILIES, patch_for_vllm

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MOE = sorted(name for name, family in FAMILIES.items() if family.moe)
PROMPT = "The capital of Vorlan is"
TEXT = "The capital of Vorlan is Daleglen. The capital of Vorlan is Daleglen."

SCRIPT = r"""
import gc, json, sys
if __name__ == "__main__":  # vLLM spawns its engine process
    from vllm import LLM, SamplingParams
    out = {}
    for folder in sys.argv[2:]:
        llm = LLM(model=folder, max_model_len=128, dtype="bfloat16", enforce_eager=True)
        res = llm.generate([sys.argv[1]], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
        out[folder] = list(res[0].outputs[0].token_ids)
        del llm
        gc.collect()
    print("RESULT " + json.dumps(out))
"""


def trained_folder(family: str, root) -> str:
    """A tiny model of the family, trained for a few steps on one sentence so its greedy
    continuation is decided by margins bf16 keeps (a random-init model's near-ties are not),
    saved in bf16 as train/stage.py saves a full finetune."""
    import torch

    from tailorlm.models import ensure_tiny_model, load_model, load_tokenizer

    spec = TinyModelSpec(factory=family, hidden_size=128, num_layers=2, vocab_size=512)
    base = ensure_tiny_model(spec, root / "base")
    tok = load_tokenizer(str(base))
    model = load_model(str(base), dtype="float32")
    ids = torch.tensor([tok(TEXT)["input_ids"]])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(150):  # until the sentence is memorized: margins of whole nats, not bf16 noise
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.05, f"{family}: the sentence was not memorized (loss {loss.item():.3f})"
    out = root / family
    model.to(torch.bfloat16).save_pretrained(out)
    patch_for_vllm(out)
    tok.save_pretrained(out)
    return str(out)


def hf_greedy(folder: str, n: int = 6) -> list[int]:
    import torch

    from tailorlm.models import load_model, load_tokenizer

    tok = load_tokenizer(folder)
    model = load_model(folder, dtype="bfloat16").eval()
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, ids.shape[1] :].tolist()


# quantized experts on vLLM's CPU MoE kernels (int8 W8A8, int4 W4A16); DeepSeek's routing has none
QUANTIZED = {"mixtral": "w4a16", "qwen2_moe": "w8a8"}


def test_every_moe_family_serves_on_vllm_cpu_and_matches_transformers(tmp_path):
    """Also the quantized variants export/moe_quant.py writes (experts quantized, routers not):
    vLLM's greedy output on them matches transformers' on their decompressed weights."""
    from tailorlm.export.moe_quant import dequantized_folder
    from tailorlm.export.quantize import quantize

    folders = {family: trained_folder(family, tmp_path) for family in MOE}
    expected = {family: hf_greedy(folder) for family, folder in folders.items()}
    for family, scheme in QUANTIZED.items():
        name = f"{family}-{scheme}"
        folders[name] = quantize(folders[family], str(tmp_path / name), scheme, "rtn")
        expected[name] = hf_greedy(dequantized_folder(folders[name], str(tmp_path / f"{name}-deq")))
    script = tmp_path / "gen.py"
    script.write_text(SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), PROMPT, *folders.values()],
        capture_output=True,
        text=True,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
        timeout=900,
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, proc.stdout[-2000:] + proc.stderr[-6000:]
    got = json.loads(line[7:])
    served = {family: got[folder] for family, folder in folders.items()}
    print(f"greedy token ids, vLLM vs transformers: { {f: (served[f], expected[f]) for f in folders} }")
    assert served == expected
