"""Fuzzing the guard: schemathesis over the served OpenAPI schema (valid and invalid bodies for
every allow-listed route), hypothesis over arbitrary JSON, paths and header bytes. Invariants:
no 5xx, every error is an OpenAI error object, nothing reaches the app without a key, and what
reaches it is within the caps. Bounded example counts keep this to seconds; the
HYPOTHESIS_PROFILE=nightly profile runs more."""

import asyncio
import json
import os

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tailorlm.config import load_config
from tailorlm.serving.routes import ROUTES
from tailorlm.serving.security import Guard, GuardSettings

settings.register_profile("ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("nightly", max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

CAP, MAX_N, MAX_PROMPTS = 32, 3, 4
FORWARDED: list = []


async def recording_app(scope, receive, send):
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        return await send({"type": "lifespan.shutdown.complete"})
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    FORWARDED.append((scope["path"], json.loads(body) if body else None))
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"object": "list", "data": []}'})


def guard() -> Guard:
    sc = load_config(
        None,
        [
            "serve.guard.api_keys=[fuzz-key]",
            "serve.host=0.0.0.0",
            "serve.guard.openapi_schema=true",
            f"serve.guard.max_tokens_cap={CAP}",
            f"serve.guard.max_n={MAX_N}",
            f"serve.guard.max_prompts={MAX_PROMPTS}",
            "serve.guard.rate_limit_per_minute=1000000",
            "serve.guard.tokens_per_minute=100000000",
            "serve.guard.auth_failures_per_minute=1000000",
            "serve.guard.blocklist=['forbidden']",
        ],
    ).serve
    return Guard(recording_app, GuardSettings.from_config(sc))


APP = guard()
schema = schemathesis.openapi.from_asgi("/openapi.json", APP, headers={"Authorization": "Bearer fuzz-key"})


def check_forwarded_within_caps():
    generating = {r.path for r in ROUTES if r.generates}
    for path, body in FORWARDED:
        if path not in generating:
            assert body is None, (path, body)  # a body-less route gets no client body passed on
            continue
        outs = [body.get(f) for f in ("max_tokens", "max_completion_tokens") if body.get(f) is not None]
        assert outs and max(outs) <= CAP, body
        assert (body.get("n") or 1) <= MAX_N
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            assert len(prompt) <= MAX_PROMPTS
    FORWARDED.clear()


@schema.parametrize()
def test_schemathesis_finds_no_5xx_and_only_openai_errors(case):
    FORWARDED.clear()
    response = case.call(headers={"Authorization": "Bearer fuzz-key"})
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code >= 400:
        err = response.json()["error"]
        assert {"message", "type", "param", "code"} <= set(err)
    check_forwarded_within_caps()
    unauth = case.call(headers={"Authorization": "Bearer wrong"})
    assert unauth.status_code == 401 or case.path == "/health"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=25,
)
field_names = st.sampled_from(
    [
        "model",
        "prompt",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "n",
        "stream",
        "temperature",
        "stop",
        "role",
        "content",
        "tools",
        "response_format",
        "logprobs",
    ]
)
bodies = st.dictionaries(field_names, json_values, max_size=6) | json_values


def call(scope_path: str, method: str, headers: list, body: bytes) -> list[dict]:
    sent: list[dict] = []
    chunks = [body]

    async def receive():
        if chunks:
            return {"type": "http.request", "body": chunks.pop(), "more_body": False}
        return {"type": "http.disconnect"}

    async def send(msg):
        sent.append(msg)

    scope = {"type": "http", "method": method, "path": scope_path, "headers": headers, "client": ("10.1.2.3", 5)}
    asyncio.run(APP(scope, receive, send))
    return sent


@given(route=st.sampled_from(ROUTES), body=bodies, with_key=st.booleans())
def test_arbitrary_json_bodies(route, body, with_key):
    FORWARDED.clear()
    headers = [(b"authorization", b"Bearer fuzz-key")] if with_key else []
    sent = call(route.path, route.method, headers, json.dumps(body).encode())
    status = sent[0]["status"]
    assert status < 500 and (with_key or status == 401)
    if status >= 400:
        assert {"message", "type", "param", "code"} <= set(json.loads(sent[1]["body"])["error"])
    if not with_key:
        assert FORWARDED == []
    check_forwarded_within_caps()


@given(
    path=st.text(max_size=40).map(lambda p: "/" + p),
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
    header=st.binary(max_size=30),
    body=st.binary(max_size=200),
    with_key=st.booleans(),
)
def test_arbitrary_paths_headers_and_bytes(path, method, header, body, with_key):
    FORWARDED.clear()
    headers = [(b"x-fuzz", header), (b"authorization", b"Bearer " + (b"fuzz-key" if with_key else header))]
    sent = call(path, method, headers, body)
    status = sent[0]["status"]
    assert status < 500
    known = {(r.method, r.path) for r in ROUTES} | {("GET", "/health"), ("GET", "/openapi.json")}
    if (method, path) not in known:
        assert status in (401, 404, 405, 429)
    if not with_key and path != "/health":
        assert FORWARDED == [] and status in (401, 404, 405, 429)
    FORWARDED.clear()
