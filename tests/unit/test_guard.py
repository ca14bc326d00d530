"""The serving guard on a stand-in ASGI app: keys, rate limits, caps, filters, error bodies."""

import json

import httpx
import pytest

from tailorlm.config import load_config
from tailorlm.serving.security import Guard, GuardSettings

SEEN = []


async def echo_app(scope, receive, send):
    """Stands in for the OpenAI ingress: echoes the body it was given."""
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    SEEN.append(json.loads(body) if body else None)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"ok": true}'})


async def detail_404(scope, receive, send):
    body = b'{"detail": "Could not find base model with ID \\"nope\\"."}'
    await send({"type": "http.response.start", "status": 404, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


@pytest.mark.anyio
async def test_non_openai_error_bodies_are_rewritten():
    sc = load_config(None).serve
    app = Guard(detail_404, GuardSettings.from_config(sc))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "not_found_error" and "nope" in r.json()["error"]["message"]


def client(**overrides) -> httpx.AsyncClient:
    sc = load_config(None, [f"serve.{'' if k == 'host' else 'guard.'}{k}={v}" for k, v in overrides.items()]).serve
    app = Guard(echo_app, GuardSettings.from_config(sc))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def _err(resp):
    body = resp.json()
    assert set(body["error"]) >= {"message", "type", "code"}
    return body["error"]


@pytest.mark.anyio
async def test_keys_required_beyond_localhost(monkeypatch):
    monkeypatch.setenv("TAILORLM_API_KEYS", "k1,k2")
    async with client(host="0.0.0.0") as c:
        assert (await c.get("/health")).status_code == 200  # health needs no key
        r = await c.get("/v1/models")
        assert r.status_code == 401 and _err(r)["type"] == "authentication_error"
        assert (await c.get("/v1/models", headers={"Authorization": "Bearer nope"})).status_code == 401
        assert (await c.get("/v1/models", headers={"Authorization": "Bearer k2"})).status_code == 200


def test_no_keys_beyond_localhost_is_a_startup_error(monkeypatch):
    from tailorlm.serving import keys

    monkeypatch.delenv("TAILORLM_API_KEYS", raising=False)
    monkeypatch.setattr(keys, "_TAKEN", {})  # nor keys an earlier test's take_from_env holds
    with pytest.raises(ValueError, match="TAILORLM_API_KEYS"):
        GuardSettings.from_config(load_config(None, ["serve.host=0.0.0.0"]).serve)


@pytest.mark.anyio
async def test_localhost_needs_no_key_and_caps_apply(monkeypatch):
    monkeypatch.delenv("TAILORLM_API_KEYS", raising=False)
    async with client(max_tokens_cap=64, max_request_bytes=2048, blocklist="[secret\\d+]") as c:
        ok = await c.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        assert ok.status_code == 200 and SEEN[-1]["max_tokens"] == 64  # uncapped requests get the cap
        r = await c.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 65})
        assert r.status_code == 400 and _err(r)["param"] == "max_tokens"
        r = await c.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": "ten"})
        assert r.status_code == 400
        r = await c.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and "not valid JSON" in _err(r)["message"]
        r = await c.post("/v1/completions", json={"model": "m", "prompt": "x" * 5000})
        assert r.status_code == 413
        r = await c.post(
            "/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "tell me secret42"}]}
        )
        assert r.status_code == 400 and _err(r)["type"] == "content_filter"
        r = await c.post("/v1/chat/completions", json={"model": "m", "messages": "hi"})
        assert r.status_code == 400 and _err(r)["param"] == "messages"


@pytest.mark.anyio
async def test_rate_limit_per_key(monkeypatch):
    monkeypatch.setenv("TAILORLM_API_KEYS", "a,b")
    async with client(rate_limit_per_minute=5) as c:
        codes = [(await c.get("/v1/models", headers={"Authorization": "Bearer a"})).status_code for _ in range(7)]
        assert codes[:5] == [200] * 5 and codes[5:] == [429, 429]
        # another key has its own budget
        assert (await c.get("/v1/models", headers={"Authorization": "Bearer b"})).status_code == 200


@pytest.fixture
def anyio_backend():
    return "asyncio"


def _settings(*overrides):
    return GuardSettings.from_config(load_config(None, ["serve.variants=[bf16,w4a16]", *overrides]).serve)


@pytest.mark.anyio
async def test_ab_split_routes_by_weight_and_sticks_per_key():
    SEEN.clear()
    split = "serve.ab.split={demo: 3, demo-w4a16: 1}"
    app = Guard(echo_app, _settings(split, "serve.ab.sticky=false"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        for _ in range(200):
            assert (await c.post("/v1/completions", json={"model": "demo", "prompt": "hi"})).status_code == 200
        await c.post("/v1/completions", json={"model": "demo-w4a16", "prompt": "hi"})  # named: not split
    models = [b["model"] for b in SEEN[:200]]
    assert abs(models.count("demo-w4a16") - 50) <= 3 and set(models) == {"demo", "demo-w4a16"}
    assert SEEN[200]["model"] == "demo-w4a16"

    SEEN.clear()
    app = Guard(echo_app, _settings(split, "serve.guard.api_keys=[k1,k2,k3,k4,k5,k6]"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        for key in ["k1", "k2", "k3", "k4", "k5", "k6"] * 5:
            await c.post(
                "/v1/completions", json={"model": "demo", "prompt": "hi"}, headers={"Authorization": f"Bearer {key}"}
            )
    arms = {}
    for key, body in zip(["k1", "k2", "k3", "k4", "k5", "k6"] * 5, SEEN):
        arms.setdefault(key, set()).add(body["model"])
    assert all(len(a) == 1 for a in arms.values())  # sticky: one arm per key


def test_ab_split_must_name_hosted_models():
    from tailorlm.config import ConfigError

    with pytest.raises(ConfigError, match="not a hosted model"):
        load_config(None, ["serve.ab.split={demo-fp8: 1}"])


def _answer_app(text: str, stream: bool):
    async def app(scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream" if stream else b"application/json")],
            }
        )
        if not stream:
            body = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
            return await send({"type": "http.response.body", "body": body})
        for word in text.split(" "):
            event = json.dumps({"choices": [{"delta": {"content": word + " "}}]}).encode()
            await send({"type": "http.response.body", "body": b"data: " + event + b"\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    return app


@pytest.mark.anyio
async def test_response_filter_blocks_answers_and_cuts_streams():
    s = _settings("serve.guard.response_blocklist=['secret\\s+plan']")
    req = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=Guard(_answer_app("the secret  plan is here", False), s)), base_url="http://t"
    ) as c:
        r = await c.post("/v1/chat/completions", json=req)
    assert r.status_code == 400 and r.json()["error"]["type"] == "content_filter"
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=Guard(_answer_app("a harmless answer", False), s)), base_url="http://t"
    ) as c:
        r = await c.post("/v1/chat/completions", json=req)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "a harmless answer"
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=Guard(_answer_app("one two secret plan three four", True), s)),
        base_url="http://t",
    ) as c:
        r = await c.post("/v1/chat/completions", json={**req, "stream": True})
    events = [e[6:] for e in r.text.split("\n\n") if e.startswith("data: ")]
    words = [json.loads(e)["choices"][0]["delta"]["content"] for e in events[:-2]]
    assert words == ["one ", "two ", "secret "]  # "plan" completed the match: withheld, stream ended
    assert json.loads(events[-2])["error"]["type"] == "content_filter" and events[-1] == "[DONE]"
