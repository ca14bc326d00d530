"""The real stack, default backend: vLLM's OpenAI app around AsyncLLM in one Ray Serve replica,
our guard, the openai client. Two engines (the same weights under two names) and a LoRA adapter
from a local folder share the replica."""

import os

import httpx
import pytest

from tailorlm.config import load_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]
PORT = 8011


def make_adapter(base: str, out) -> str:
    """A peft LoRA adapter with large random B matrices, so that it visibly changes the output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def served(ray_local, tiny_model_path, tmp_path_factory):
    from ray import serve

    from tailorlm.serving.stage import sample_chat, start

    os.environ["TAILORLM_API_KEYS"] = "test-key"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    adapter = make_adapter(tiny_model_path, tmp_path_factory.mktemp("adapter"))
    cfg = load_config(None, [f"serve.port={PORT}", "serve.require_api_key=true", "serve.max_model_len=256",
                             "serve.max_tokens_cap=32", "serve.model_id=tiny",
                             f"serve.lora_adapters={{tiny-lora: {adapter}}}"])
    start(cfg, {"tiny": tiny_model_path, "tiny-b": tiny_model_path})
    first = sample_chat(cfg, "tiny", timeout_s=600)
    yield cfg, first
    serve.delete("tailorlm")
    serve.shutdown()


def test_openai_client_chat_completions_and_streaming(served):
    import openai

    cfg, first = served
    assert isinstance(first["answer"], str) and first["usage"]["completion_tokens"] >= 1
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key="test-key", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny", "tiny-lora", "tiny-b"]
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                          max_tokens=8, temperature=0)
    assert chat.choices[0].finish_reason in ("length", "stop") and chat.usage.prompt_tokens > 5
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=6, temperature=0, stream=True))
    assert len(chunks) >= 2 and chunks[-1].choices[-1].finish_reason in ("length", "stop") if chunks[-1].choices \
        else len(chunks) >= 2
    comp = client.completions.create(model="tiny", prompt="The capital of", max_tokens=5, temperature=0)
    assert comp.usage.completion_tokens >= 1
    # direct ingress (the default for one replica): the replica itself answers on PORT, and the
    # proxy Ray keeps on the head node moved to PORT + 1; both run the same guarded app
    assert httpx.get(f"http://127.0.0.1:{PORT + 1}/v1/models").status_code == 401
    assert httpx.get(f"http://127.0.0.1:{PORT + 1}/v1/models",
                     headers={"Authorization": "Bearer test-key"}).json()["data"][0]["id"] == "tiny"


def test_models_and_adapters_route_by_name(served):
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key="test-key", max_retries=0)

    def greedy(model: str) -> str:
        return client.completions.create(model=model, prompt="The capital of Daleglen is", max_tokens=12,
                                         temperature=0).choices[0].text

    base = greedy("tiny")
    assert greedy("tiny-b") == base  # the same weights in a second engine
    assert greedy("tiny-lora") != base  # the adapter is applied


def test_errors_are_4xx_with_openai_bodies(served):
    base = f"http://127.0.0.1:{PORT}"
    auth = {"Authorization": "Bearer test-key"}
    with httpx.Client(base_url=base, timeout=60) as c:
        assert c.get("/health").status_code == 200
        assert c.get("/v1/models").status_code == 401
        r = c.post("/v1/chat/completions", headers=auth, json={"model": "nope",
                                                                "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
        r = c.post("/v1/completions", headers=auth, json={"model": "tiny", "prompt": "word " * 600, "max_tokens": 4})
        assert 400 <= r.status_code < 500 and "error" in r.json()
        r = c.post("/v1/completions", headers=auth, json={"model": "tiny", "prompt": "x", "max_tokens": 1000})
        assert r.status_code == 400
        r = c.post("/v1/chat/completions", headers=auth, json={"model": "tiny", "temperature": "hot",
                                                                "messages": [{"role": "user", "content": "x"}]})
        assert 400 <= r.status_code < 500 and "error" in r.json()


def test_engine_and_guard_metrics_reach_rays_prometheus_endpoint(served):
    """After the requests above: vLLM's token counters (through serving.engine_metrics) and the
    guard's request counter, per model, on the node's metrics export port."""
    import re
    import time

    import ray

    port = ray.nodes()[0]["MetricsExportPort"]
    deadline, text = time.time() + 60, ""
    while time.time() < deadline:  # the agent exports every few seconds
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        tokens = [float(v) for v in re.findall(r'vllm_generation_tokens\w*\{[^}]*model_name="tiny"[^}]*\} (\S+)', text)]
        requests = re.findall(r'tailorlm_requests\w*\{[^}]*path="/v1/completions"[^}]*status="200"[^}]*\} (\S+)', text)
        if tokens and sum(tokens) > 0 and requests:
            return
        time.sleep(3)
    names = sorted(set(re.findall(r"^(\w+)", text, flags=re.M)))
    raise AssertionError(f"no vllm_generation_tokens / tailorlm_requests samples for model tiny; exported: {names[:80]}")
