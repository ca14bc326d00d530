"""The guard as a hostile client meets it: deny by default, caps on every cost field, filters on
every text the engine sees, 4xx (never 5xx) for garbage, throttled key guessing, load shedding,
aborted work on disconnect. A stand-in app plays vLLM; the real stack is in
tests/integration/test_serve_hostile.py."""

import asyncio
import json

import httpx
import pytest

from tailorlm.config import load_config
from tailorlm.serving import keys
from tailorlm.serving.replies import run_abortable
from tailorlm.serving.routes import ROUTES
from tailorlm.serving.security import Guard, GuardSettings

SEEN: list = []
KEY = {"Authorization": "Bearer k1"}
CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def echo_app(scope, receive, send):
    """Stands in for vLLM: records the body it was given, answers 200."""
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    SEEN.append((scope["path"], json.loads(body) if body else None))
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"choices": [{"text": "ok"}]}'})


def settings(*overrides) -> GuardSettings:
    return GuardSettings.from_config(
        load_config(None, ["serve.guard.api_keys=[k1,k2]", "serve.host=0.0.0.0", *overrides]).serve
    )


def client(app=echo_app, *overrides, tokenizer=None) -> httpx.AsyncClient:
    guard = Guard(app, settings(*overrides), tokenizer)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=guard), base_url="http://t")


def _error(r: httpx.Response) -> dict:
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    return err


# vLLM 0.32's app mounts these besides the allow-list (the integration test enumerates the live app)
VLLM_EXTRA = [
    "/invocations",
    "/tokenize",
    "/detokenize",
    "/generative_scoring",
    "/is_scaling_elastic_ep",
    "/scale_elastic_ep",
    "/metrics",
    "/openapi.json",
    "/docs",
    "/version",
    "/load",
    "/kv_event_sources",
    "/v1/responses",
    "/v1/messages",
    "/v1/embeddings",
    "/ping",
    "/v1/models/demo",
    "/v1",
    "/",
]


@pytest.mark.anyio
async def test_deny_by_default():
    SEEN.clear()
    async with client() as c:
        for path in VLLM_EXTRA:
            for method in ("GET", "POST"):
                r = await c.request(method, path, json=CHAT)
                assert r.status_code == 401, (method, path)  # no key: nothing but /health answers
                r = await c.request(method, path, json=CHAT, headers=KEY)
                assert r.status_code == 404 and _error(r)["type"] == "not_found_error", (method, path)
        for route in ROUTES:
            assert (await c.request(route.method, route.path, json=CHAT)).status_code == 401
        r = await c.get("/health")
        assert r.status_code == 200 and r.json() == {"status": "ok"}  # says nothing beyond ok
        r = await c.get("/v1/chat/completions", headers=KEY)
        assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert SEEN == []  # nothing reached the app


@pytest.mark.anyio
async def test_openapi_schema_only_when_configured_and_behind_the_key():
    async with client(echo_app, "serve.guard.openapi_schema=true") as c:
        assert (await c.get("/openapi.json")).status_code == 401
        paths = (await c.get("/openapi.json", headers=KEY)).json()["paths"]
        assert set(paths) == {r.path for r in ROUTES} | {"/health"}


@pytest.mark.anyio
@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
async def test_every_output_field_is_capped(field):
    async with client(echo_app, "serve.guard.max_tokens_cap=64") as c:
        for extra in ({}, {"max_tokens": None}, {"max_tokens": 1}):
            r = await c.post("/v1/chat/completions", headers=KEY, json={**CHAT, **extra, field: 65})
            assert r.status_code == 400 and _error(r)["param"] == field, extra
        r = await c.post("/v1/chat/completions", headers=KEY, json={**CHAT, field: 64})
        assert r.status_code == 200


@pytest.mark.anyio
async def test_n_prompt_lists_and_the_token_budget_are_capped():
    SEEN.clear()
    async with client(
        echo_app,
        "serve.guard.max_n=2",
        "serve.guard.max_prompts=3",
        "serve.guard.max_tokens_cap=100",
        "serve.guard.tokens_per_minute=1000",
    ) as c:
        r = await c.post("/v1/completions", headers=KEY, json={"model": "m", "prompt": "x", "n": 3})
        assert r.status_code == 400 and _error(r)["param"] == "n"
        r = await c.post("/v1/completions", headers=KEY, json={"model": "m", "prompt": ["a"] * 4})
        assert r.status_code == 400 and _error(r)["param"] == "prompt"
        r = await c.post("/v1/completions", headers=KEY, json={"model": "m", "prompt": [[1, 2]] * 4})
        assert r.status_code == 400 and _error(r)["param"] == "prompt"
        # 3 prompts x n 2 x 100 = 600 of 1000: one passes, the next is over the budget -> 429
        big = {"model": "m", "prompt": ["a", "b", "c"], "n": 2, "max_tokens": 100}
        assert (await c.post("/v1/completions", headers=KEY, json=big)).status_code == 200
        r = await c.post("/v1/completions", headers=KEY, json=big)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        # the other key has its own budget
        assert (await c.post("/v1/completions", headers={"Authorization": "Bearer k2"}, json=big)).status_code == 200
    assert SEEN[0][1]["max_tokens"] == 100


class FakeTokenizer:
    """Characters as token ids: enough to count tokens and read token-id prompts."""

    def encode(self, text, add_special_tokens=False):
        return [ord(ch) for ch in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)

    def __len__(self):
        return 0x110000


@pytest.mark.anyio
async def test_prompt_filter_sees_every_text_the_engine_sees():
    block = "serve.guard.blocklist=['forbidden']"
    bad_chats = [
        [{"role": "system", "content": "forbidden"}, {"role": "user", "content": "hi"}],
        [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "forbidden"}]}],
        [{"role": "user", "content": "for\u200bbidden"}],  # zero-width space inside the word
        [{"role": "user", "content": "f\u043erbidden"}],  # Cyrillic o
        [{"role": "user", "content": "ｆｏｒｂｉｄｄｅｎ"}],  # full-width
        [{"role": "user", "content": "forbi\u0301dden"}],  # a combining accent
        [{"role": "assistant", "content": "FORBIDDEN"}, {"role": "user", "content": "go on"}],
    ]
    async with client(echo_app, block, tokenizer=FakeTokenizer()) as c:
        for messages in bad_chats:
            r = await c.post("/v1/chat/completions", headers=KEY, json={"model": "m", "messages": messages})
            assert r.status_code == 400 and _error(r)["type"] == "content_filter", messages
        for prompt in (
            ["ok", "forbidden"],
            [ord(ch) for ch in "forbidden"],
            [[111, 107], [ord(ch) for ch in "forbidden"]],
        ):
            r = await c.post("/v1/completions", headers=KEY, json={"model": "m", "prompt": prompt})
            assert r.status_code == 400 and _error(r)["type"] == "content_filter", prompt
        assert (await c.post("/v1/chat/completions", headers=KEY, json=CHAT)).status_code == 200
    async with client(echo_app, "serve.guard.blocklist=['禁止']") as c:  # other scripts match as written
        r = await c.post("/v1/completions", headers=KEY, json={"model": "m", "prompt": "这是禁止的"})
        assert r.status_code == 400


@pytest.mark.anyio
async def test_garbage_is_4xx_never_5xx():
    async with client() as c:
        deep = b"[" * 5000 + b"]" * 5000
        cases = [
            (b'{"model": "m", "messages": ' + deep + b"}", 400),
            (b'{"model": "m", "prompt": "x", "temperature": NaN}', 400),
            (b'{"model": "m", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", 400),
            (b"\xff\xfe", 400),
            (b"[]", 400),
            (b'{"model": "m", "prompt": "x", "tools": []}', 400),
            (b'{"model": "m", "prompt": "x", "max_tokens": true}', 400),
            (b'{"model": "m", "messages": [{"role": "tool", "content": "x"}]}', 400),
        ]
        for body, status in cases:
            path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
            r = await c.post(path, headers={**KEY, "content-type": "application/json"}, content=body)
            assert r.status_code == status, body[:80]
            _error(r)
        r = await c.post("/v1/completions", headers={**KEY, "content-length": "abc"}, content=b"{}")
        assert r.status_code == 400
        r = await c.post("/v1/chat/completions", headers=KEY, json={**CHAT, "response_format": {"type": "json_object"}})
        assert r.status_code == 400 and _error(r)["param"] == "response_format"
    # a header with a non-UTF-8 byte (legal obs-text) and no valid key: 401, not 500
    guard = Guard(echo_app, settings())
    sent = []

    async def send(msg):
        sent.append(msg)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/v1/models",
        "headers": [(b"x-odd", b"\xff\xfe"), (b"authorization", b"Bearer \xe9")],
        "client": ("10.0.0.9", 1),
    }
    await guard(scope, receive, send)
    assert sent[0]["status"] == 401


@pytest.mark.anyio
async def test_key_guessing_is_throttled_per_address():
    async with client(echo_app, "serve.guard.auth_failures_per_minute=5") as c:
        codes = [
            (await c.get("/v1/models", headers={"Authorization": f"Bearer guess{i}"})).status_code for i in range(8)
        ]
        assert codes[:5] == [401] * 5 and codes[5:] == [429] * 3
        r = await c.get("/v1/models", headers=KEY)  # locked out: even a right key waits
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    other = Guard(echo_app, settings("serve.guard.auth_failures_per_minute=5"))
    sent = []

    async def send(msg):
        sent.append(msg)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    for addr in ("10.0.0.1", "10.0.0.2"):
        for _ in range(6):
            await other(
                {
                    "type": "http",
                    "method": "GET",
                    "path": "/v1/models",
                    "client": (addr, 1),
                    "headers": [(b"authorization", b"Bearer wrong")],
                },
                receive,
                send,
            )
    statuses = [m["status"] for m in sent if m["type"] == "http.response.start"]
    assert statuses == ([401] * 5 + [429]) * 2  # each address has its own allowance


def test_keys_are_held_as_digests_only():
    import pickle

    s = settings("serve.guard.api_keys=[sekrit-key-1]")
    blob = pickle.dumps(s)
    assert b"sekrit-key-1" not in blob and keys.digest("sekrit-key-1") in s.key_digests
    assert keys.matching_digest("sekrit-key-1", s.key_digests) and not keys.matching_digest("sekrit", s.key_digests)


def test_keys_taken_from_the_environment_stay_in_this_process(monkeypatch):
    monkeypatch.setenv("TAILORLM_TEST_KEYS", " a1 , b2 ")
    sc = load_config(None, ["serve.guard.api_keys_env=TAILORLM_TEST_KEYS"]).serve.guard
    keys.take_from_env("TAILORLM_TEST_KEYS")
    import os

    assert "TAILORLM_TEST_KEYS" not in os.environ and keys.read_keys(sc) == ["a1", "b2"]


@pytest.mark.anyio
async def test_allow_ips_checked_before_the_key():
    async with client(echo_app, "serve.guard.allow_ips=['10.0.0.0/8']") as c:  # the test client is 127.0.0.1
        r = await c.get("/v1/models", headers=KEY)
        assert r.status_code == 403 and _error(r)["type"] == "permission_error"
    async with client(echo_app, "serve.guard.allow_ips=['127.0.0.1/32', '::1']") as c:
        assert (await c.get("/v1/models", headers=KEY)).status_code == 200


@pytest.mark.anyio
async def test_stalled_body_times_out_with_408():
    guard = Guard(echo_app, settings("serve.guard.body_timeout_s=0.2"))
    sent = []

    async def send(msg):
        sent.append(msg)

    async def stalls():
        await asyncio.sleep(3600)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/completions",
        "client": ("127.0.0.1", 1),
        "headers": [(b"authorization", b"Bearer k1"), (b"content-length", b"100")],
    }
    await asyncio.wait_for(guard(scope, stalls, send), timeout=5)
    assert sent[0]["status"] == 408 and guard.inflight == 0


@pytest.mark.anyio
async def test_over_capacity_sheds_at_once_with_retry_after():
    release = asyncio.Event()

    async def slow_app(scope, receive, send):
        await receive()
        await release.wait()
        await echo_app(scope, lambda: _body(b"{}"), send)

    async def _body(b):
        return {"type": "http.request", "body": b, "more_body": False}

    # capacity = max_ongoing_requests + max_queued_requests = 2 + 1
    async with client(slow_app, "serve.replicas.max_ongoing_requests=2", "serve.replicas.max_queued_requests=1") as c:
        tasks = [asyncio.create_task(c.post("/v1/chat/completions", headers=KEY, json=CHAT)) for _ in range(3)]
        await asyncio.sleep(0.2)
        r = await c.post("/v1/chat/completions", headers=KEY, json=CHAT)
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and _error(r)["code"] == "overloaded"
        release.set()
        assert [t.status_code for t in await asyncio.gather(*tasks)] == [200] * 3


@pytest.mark.anyio
async def test_app_errors_keep_retry_after_and_get_openai_shape():
    async def limited(scope, receive, send):
        await send(
            {
                "type": "http.response.start",
                "status": 429,
                "headers": [(b"content-type", b"application/json"), (b"retry-after", b"7")],
            }
        )
        await send({"type": "http.response.body", "body": b'{"detail": "slow down"}'})

    async with client(limited) as c:
        r = await c.post("/v1/chat/completions", headers=KEY, json=CHAT)
    assert r.status_code == 429 and r.headers["retry-after"] == "7" and _error(r)["message"] == "slow down"


@pytest.mark.anyio
async def test_a_cancelled_request_tells_the_app_of_the_disconnect():
    """Ray Serve's direct ingress cancels the ASGI task on a client disconnect; the app (vLLM's
    with_cancellation) must still see http.disconnect, or its engine request runs on."""
    seen, started = [], asyncio.Event()

    async def app(scope, receive, send):
        await receive()  # the body
        started.set()
        seen.append(await receive())  # vLLM's listen_for_disconnect

    async def client_receive():
        await asyncio.sleep(3600)

    async def send(msg):
        pass

    outer = asyncio.create_task(run_abortable(app, {"type": "http"}, b"{}", client_receive, send))
    await started.wait()
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outer
    assert seen == [{"type": "http.disconnect"}]


@pytest.mark.anyio
async def test_response_filter_holds_on_every_choice_and_normalized_text():
    async def answers(scope, receive, send):
        await receive()
        body = {"choices": [{"index": 0, "text": "fine"}, {"index": 1, "text": "the se\u200bcret plan"}]}
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})

    async with client(answers, "serve.guard.response_blocklist=['secret plan']") as c:
        r = await c.post("/v1/completions", headers=KEY, json={"model": "m", "prompt": "x", "n": 2})
    assert r.status_code == 400 and _error(r)["type"] == "content_filter"


@pytest.mark.anyio
async def test_only_listed_headers_reach_the_app_and_never_the_key():
    seen = []

    async def app(scope, receive, send):
        seen.append(dict(scope["headers"]))
        await echo_app(scope, receive, send)

    async with client(app) as c:
        await c.post(
            "/v1/chat/completions",
            json=CHAT,
            headers={**KEY, "x-request-id": "mine", "endpoint-load-metrics-format": "TEXT"},
        )
        await c.get("/v1/models", headers=KEY)
    for headers in seen:
        assert b"authorization" not in headers and b"x-request-id" not in headers
        assert b"endpoint-load-metrics-format" not in headers
    assert seen[0][b"content-type"] == b"application/json"


def test_client_addresses_count_as_what_they_are():
    from tailorlm.serving.security import client_address

    assert client_address({"client": ("::ffff:10.0.0.1", 1)})[0] == "10.0.0.1"  # IPv4 mapped into IPv6
    a = client_address({"client": ("2001:db8::1", 1)})[0]
    assert a == client_address({"client": ("2001:db8::ffff:1", 1)})[0] == "2001:db8::/64"  # one host's /64


@pytest.mark.anyio
async def test_echo_with_logprobs_is_refused():
    async with client() as c:
        r = await c.post(
            "/v1/completions", headers=KEY, json={"model": "m", "prompt": "x", "echo": True, "logprobs": 1}
        )
    assert r.status_code == 400 and _error(r)["param"] == "echo"
