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
        r = await c.post("/v1/chat/completions", json={"model": "nope", "messages": []})
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "not_found_error" and "nope" in r.json()["error"]["message"]


def client(**overrides) -> httpx.AsyncClient:
    sc = load_config(None, [f"serve.{k}={v}" for k, v in overrides.items()]).serve
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
    monkeypatch.delenv("TAILORLM_API_KEYS", raising=False)
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
        r = await c.post("/v1/chat/completions", json={"model": "m", "messages": [
            {"role": "user", "content": "tell me secret42"}]})
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
