"""The ray_llm backend: the same guard in front of ray.serve.llm's OpenAI ingress and engine
deployment, with the openai client."""

import os

import pytest

from tailorlm.config import load_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]
PORT = 8012


def test_ray_llm_backend_chats_streams_and_guards(ray_local, tiny_model_path):
    import httpx
    import openai
    from ray import serve

    from tailorlm.serving.stage import sample_chat, start

    os.environ["TAILORLM_API_KEYS"] = "test-key"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    cfg = load_config(
        None,
        [
            f"serve.port={PORT}",
            "serve.guard.require_api_key=true",
            "serve.engine.max_model_len=256",
            "serve.guard.max_tokens_cap=32",
            "serve.model_id=tiny",
            "serve.backend=ray_llm",
        ],
    )
    start(cfg, {"tiny": tiny_model_path})
    try:
        first = sample_chat(cfg, "tiny", timeout_s=600)
        assert first["usage"]["completion_tokens"] >= 1
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key="test-key", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        chunks = list(
            client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0, stream=True
            )
        )
        assert len(chunks) >= 2
        with httpx.Client(base_url=f"http://127.0.0.1:{PORT}", timeout=60) as c:
            assert c.get("/v1/models").status_code == 401
            r = c.post(
                "/v1/chat/completions",
                headers={"Authorization": "Bearer test-key"},
                json={"model": "nope", "messages": [{"role": "user", "content": "x"}]},
            )
            assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    finally:
        serve.delete("tailorlm")
        serve.shutdown()
