"""The vllm backend's pieces that need no engine: the `vllm serve` flags, adapter checks, and the
router that sends each request to the app of the model it names."""

import json
from types import SimpleNamespace

import httpx
import pytest

from tailorlm.config import ConfigError, load_config
from tailorlm.serving.engine import ModelRouter, resolve_adapters, vllm_argv


def fake_vllm_app(model_id: str, adapters=()):
    """Stands in for vLLM's OpenAI app: answers with its own name and the body it got."""

    async def app(scope, receive, send):
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        out = json.dumps({"served_by": model_id, "path": scope["path"], "body": json.loads(body) if body else None})
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": out.encode()})

    async def show_available_models():
        cards = [SimpleNamespace(model_dump=lambda m=m: {"id": m, "object": "model"}) for m in (model_id, *adapters)]
        return SimpleNamespace(data=cards)

    app.state = SimpleNamespace(openai_serving_models=SimpleNamespace(show_available_models=show_available_models))
    return app


def router_client():
    apps = {"a": fake_vllm_app("a", ["a-lora"]), "b": fake_vllm_app("b")}
    router = ModelRouter(apps, {"a": "a", "a-lora": "a", "b": "b"})
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=router), base_url="http://t")


@pytest.mark.anyio
async def test_router_sends_each_model_and_adapter_to_its_app():
    async with router_client() as c:
        for model, app in [("a", "a"), ("b", "b"), ("a-lora", "a")]:
            r = await c.post("/v1/chat/completions", json={"model": model, "messages": []})
            assert r.json()["served_by"] == app and r.json()["body"]["model"] == model  # body arrives intact
        # an unknown name goes to the first app, whose vLLM answers 404 with the valid names
        assert (await c.post("/v1/completions", json={"model": "zzz", "prompt": "x"})).json()["served_by"] == "a"
        models = (await c.get("/v1/models")).json()
        assert [m["id"] for m in models["data"]] == ["a", "a-lora", "b"] and models["object"] == "list"
        assert (await c.get("/metrics")).json()["served_by"] == "a"


def test_vllm_argv_matches_config_and_engine_args():
    sc = load_config(
        None,
        [
            "serve.engine.max_model_len=256",
            "serve.engine.args={enable-prefix-caching: true, max-num-seqs: 8, enforce-eager: false}",
        ],
    ).serve
    argv = vllm_argv(sc, "m", "/models/m", {"ad": "/ad"})
    assert argv[:4] == ["--model", "/models/m", "--served-model-name", "m"]
    assert argv[argv.index("--max-model-len") + 1] == "256" and "--enable-lora" in argv
    lora = json.loads(argv[argv.index("--lora-modules") + 1])
    assert lora == {"name": "ad", "path": "/ad", "base_model_name": "m"}
    assert "--enable-prefix-caching" in argv and argv[argv.index("--max-num-seqs") + 1] == "8"
    assert "--enforce-eager" not in argv


def test_adapters_are_checked_before_serving(tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    (good / "adapter_config.json").write_text("{}")
    sc = load_config(None, [f"serve.lora_adapters={{support: {good}}}"]).serve
    assert resolve_adapters(sc) == {"support": str(good.resolve())}
    bad = load_config(None, [f"serve.lora_adapters={{support: {tmp_path}}}"]).serve
    with pytest.raises(ValueError, match="lora_adapters.support.*adapter_config.json"):
        resolve_adapters(bad)
    with pytest.raises(ConfigError, match="backend=vllm"):
        load_config(None, [f"serve.lora_adapters={{support: {good}}}", "serve.backend=ray_llm"])
    with pytest.raises(ConfigError, match="serve.backend"):
        load_config(None, ["serve.backend=tgi"])


def streaming_app(n: int, gap_s: float):
    async def app(scope, receive, send):
        import asyncio

        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for i in range(n):
            await send({"type": "http.response.body", "body": f"data: {i}\n\n".encode(), "more_body": True})
            await asyncio.sleep(gap_s)
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    return app


async def collect(app) -> list[bytes]:
    bodies = []

    async def send(msg):
        if msg["type"] == "http.response.body":
            bodies.append(msg["body"])

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    await app({"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}, receive, send)
    return bodies


@pytest.mark.anyio
async def test_stream_coalescer_merges_fast_chunks_only():
    from tailorlm.serving.engine import StreamCoalescer

    expected = b"".join(f"data: {i}\n\n".encode() for i in range(20)) + b"data: [DONE]\n\n"
    fast = await collect(StreamCoalescer(streaming_app(20, 0.001), window_s=0.05))
    assert b"".join(fast) == expected  # nothing lost, order kept
    assert fast[0] == b"data: 0\n\n" and fast[1] == b"data: 1\n\n"  # the first chunks go out at once
    assert len(fast) <= 8  # 20 chunks in ~20-40 ms, merged into windows of 50 ms
    slow = await collect(StreamCoalescer(streaming_app(4, 0.08), window_s=0.05))
    assert len(slow) == 5 and b"".join(slow) == expected.replace(
        expected[expected.index(b"data: 4") :], b"data: [DONE]\n\n"
    )
    off = await collect(StreamCoalescer(streaming_app(20, 0.001), window_s=0))
    assert len(off) == 21
