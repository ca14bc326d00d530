"""The real stack: vLLM (CPU) behind Ray Serve via ray.serve.llm, our guard, the openai client."""

import os

import httpx
import pytest

from tailorlm.config import load_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]
PORT = 8011


@pytest.fixture(scope="module")
def served(ray_local, tiny_model_path):
    from ray import serve

    from tailorlm.serving.stage import sample_chat, start

    os.environ["TAILORLM_API_KEYS"] = "test-key"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    cfg = load_config(None, [f"serve.port={PORT}", "serve.require_api_key=true", "serve.max_model_len=256",
                             "serve.max_tokens_cap=32", "serve.model_id=tiny"])
    start(cfg, {"tiny": tiny_model_path})
    first = sample_chat(cfg, "tiny", timeout_s=600)
    yield cfg, first
    serve.delete("tailorlm")
    serve.shutdown()


def test_openai_client_chat_completions_and_streaming(served):
    import openai

    cfg, first = served
    assert isinstance(first["answer"], str) and first["usage"]["completion_tokens"] >= 1
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key="test-key", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                          max_tokens=8, temperature=0)
    assert chat.choices[0].finish_reason in ("length", "stop") and chat.usage.prompt_tokens > 5
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=6, temperature=0, stream=True))
    assert len(chunks) >= 2 and chunks[-1].choices[-1].finish_reason in ("length", "stop") if chunks[-1].choices \
        else len(chunks) >= 2
    comp = client.completions.create(model="tiny", prompt="The capital of", max_tokens=5, temperature=0)
    assert comp.usage.completion_tokens >= 1


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
