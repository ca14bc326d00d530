"""Bypasses of the guard found attacking it as a hostile client would, one smallest example each.
A stand-in app plays vLLM 0.32 (its response shapes are copied from vllm's protocol classes).
Each was a failing test first (xfail(strict=True) until its fix landed)."""

import json
import time

import httpx
import pytest

from tailorlm.config import load_config
from tailorlm.serving.filters import Blocklist, StreamFilter
from tailorlm.serving.security import Guard, GuardSettings

KEY = {"Authorization": "Bearer k1"}


@pytest.fixture
def anyio_backend():
    return "asyncio"


def settings(*overrides) -> GuardSettings:
    return GuardSettings.from_config(
        load_config(None, ["serve.guard.api_keys=[k1]", "serve.host=0.0.0.0", *overrides]).serve
    )


def answering(payload: dict | None = None, sse: list[dict] | None = None):
    """A stand-in vLLM app answering `payload` (JSON) or the SSE events `sse`."""

    async def app(scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        ctype = b"text/event-stream" if sse is not None else b"application/json"
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", ctype)]})
        if sse is None:
            return await send({"type": "http.response.body", "body": json.dumps(payload).encode()})
        for event in sse:
            await send(
                {
                    "type": "http.response.body",
                    "body": b"data: " + json.dumps(event).encode() + b"\n\n",
                    "more_body": True,
                }
            )
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    return app


def client(app, *overrides) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=Guard(app, settings(*overrides))), base_url="http://t")


OK = answering({"choices": [{"index": 0, "text": "ok", "message": {"role": "assistant", "content": "ok"}}]})


# --- 5xx from a header the guard reads ------------------------------------------------------


@pytest.mark.anyio
async def test_content_length_with_a_non_ascii_digit_is_400_not_500():
    sent = []

    async def send(msg):
        sent.append(msg)

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/completions",
        "client": ("10.0.0.9", 1),
        "headers": [(b"authorization", b"Bearer k1"), (b"content-length", b"\xb2")],
    }
    await Guard(OK, settings())(scope, receive, send)
    assert sent[0]["status"] == 400


# --- the prompt filter ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_cyrillic_look_alike_letter_is_caught():
    async with client(OK, "serve.guard.blocklist=['secret']") as c:
        r = await c.post("/v1/completions", headers=KEY, json={"model": "m", "prompt": "se\u0441ret"})
    assert r.status_code == 400


@pytest.mark.anyio
@pytest.mark.parametrize(
    "parts, pattern",
    [
        # vLLM's 'string' content format (ChatML and most text templates) joins text parts with "\n"
        (["secret", "plan"], r"secret\s+plan"),
        # vLLM's 'openai' content format: templates that loop over parts print them back to back
        (["forbid", "den"], "forbidden"),
    ],
)
async def test_a_phrase_split_across_content_parts_is_caught(parts, pattern):
    body = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": p} for p in parts]}]}
    async with client(OK, f"serve.guard.blocklist=[{json.dumps(pattern)}]") as c:
        r = await c.post("/v1/chat/completions", headers=KEY, json=body)
    assert r.status_code == 400


# --- the response filter ----------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("stream", [False, True])
async def test_blocked_text_in_the_reasoning_field_is_withheld(stream):
    if stream:
        app = answering(sse=[{"choices": [{"index": 0, "delta": {"reasoning": "the secret plan"}}]}])
    else:
        app = answering(
            {
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": "fine", "reasoning": "the secret plan"}}
                ]
            }
        )
    async with client(app, "serve.guard.response_blocklist=['secret plan']") as c:
        r = await c.post(
            "/v1/chat/completions",
            headers=KEY,
            json={"model": "m", "stream": stream, "messages": [{"role": "user", "content": "hi"}]},
        )
    assert "secret plan" not in r.text


@pytest.mark.anyio
@pytest.mark.parametrize(
    "route, body, answer",
    [
        (
            "/v1/completions",
            {"model": "m", "prompt": "x", "logprobs": 5},
            {
                "choices": [
                    {
                        "index": 0,
                        "text": "fine",
                        "logprobs": {
                            "tokens": ["fine"],
                            "token_logprobs": [-0.1],
                            "text_offset": [0],
                            "top_logprobs": [{"fine": -0.1, "secret": -0.2}],
                        },
                    }
                ]
            },
        ),
        (
            "/v1/chat/completions",
            {"model": "m", "logprobs": True, "top_logprobs": 5, "messages": [{"role": "user", "content": "hi"}]},
            {
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "fine"},
                        "logprobs": {
                            "content": [
                                {
                                    "token": "fine",
                                    "logprob": -0.1,
                                    "top_logprobs": [{"token": "secret", "logprob": -0.2}],
                                }
                            ]
                        },
                    }
                ]
            },
        ),
    ],
)
async def test_blocked_text_among_the_logprobs_is_withheld(route, body, answer):
    async with client(answering(answer), "serve.guard.response_blocklist=['secret']") as c:
        r = await c.post(route, headers=KEY, json=body)
    assert "secret" not in r.text


def test_stream_filter_work_grows_linearly_with_the_stream():
    event = b"data: " + json.dumps({"choices": [{"index": 0, "text": " word"}]}).encode() + b"\n\n"

    def cost(tokens: int) -> float:
        best = float("inf")
        for _ in range(2):
            flt = StreamFilter(Blocklist(["forbidden"]), b"{}")
            start = time.process_time()
            for _ in range(tokens):
                flt.chunk(event)
            best = min(best, time.process_time() - start)
        return best

    small, large = cost(300), cost(1200)
    assert large < 9 * max(small, 1e-3)  # linear: ~4x; the quadratic filter: ~16x
