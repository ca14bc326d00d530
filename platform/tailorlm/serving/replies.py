"""ASGI plumbing of the guard: OpenAI-style error replies, the rewrite of the app's own errors
into that shape, the response filter as a `send` wrapper, the scope vLLM gets, and running the
app so that a client disconnect aborts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from tailorlm.serving.filters import Blocklist, StreamFilter, response_text

OPENAI_ERROR_TYPES = {
    "invalid_request_error",
    "authentication_error",
    "permission_error",
    "not_found_error",
    "rate_limit_error",
    "server_error",
    "content_filter",
}
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}
# what reaches vLLM of the client's headers: vLLM reads more (x-request-id sets the response id,
# endpoint-load-metrics-format returns server load, x-data-parallel-rank picks an engine rank)
FORWARDED_HEADERS = {b"host", b"accept", b"user-agent", b"accept-encoding"}


def error_body(status: int, message: str, etype: str, param: str | None = None, code: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": etype, "param": param, "code": code or status}}).encode()


def forwarded_scope(scope, body: bytes) -> dict:
    """The scope vLLM sees: the guard's own body (as JSON, with its length), of the client's
    headers only FORWARDED_HEADERS (the API key among those left behind)."""
    headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() in FORWARDED_HEADERS]
    if body:
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    return {**scope, "headers": headers}


async def run_abortable(app, scope, body: bytes, receive, send) -> None:
    """Run `app` on an already-read body so that a client disconnect aborts it.

    vLLM's handlers (`with_cancellation`) and Starlette's streaming responses stop generating
    when receive() returns http.disconnect. Ray Serve's direct ingress instead cancels the task
    running the ASGI app, which cancels vLLM's wrapper but orphans the handler task it spawned:
    the engine went on generating every token for nobody. So the app runs in a task of its own,
    shielded from that cancellation; when it comes, the app is told of the disconnect the way
    it listens for one, and given a moment to abort the engine request."""
    gone = asyncio.Event()
    first = True

    async def app_receive():
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": body, "more_body": False}
        real, ours = asyncio.ensure_future(receive()), asyncio.ensure_future(gone.wait())
        try:
            await asyncio.wait({real, ours}, return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when the app cancels its own listener: no task left behind
            for task in (real, ours):
                if not task.done():
                    task.cancel()
        return real.result() if real.done() and not real.cancelled() else {"type": "http.disconnect"}

    async def app_send(message):
        if not gone.is_set():
            await send(message)

    task = asyncio.ensure_future(app(scope, app_receive, app_send))
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        gone.set()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(task, timeout=10)
        raise


def replay(body: bytes, receive):
    """An ASGI receive that hands the app a body already read, then defers to the real one
    (which reports a client disconnect)."""
    sent = False

    async def receive_again():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive_again


def openai_errors(send):
    """Error responses from the app are held until complete and rewritten into OpenAI's shape
    (FastAPI's {"detail": ...}, vLLM's exception-class types), keeping their other headers."""
    held: dict[str, Any] = {}

    async def rewriting(message):
        if message["type"] == "http.response.start" and message["status"] >= 400:
            held.update(start=message, body=b"")
            return
        if held and message["type"] == "http.response.body":
            held["body"] += message.get("body", b"")
            if message.get("more_body"):
                return
            status = held["start"]["status"]
            keep = [
                (k, v)
                for k, v in held["start"].get("headers", [])
                if k.lower() not in (b"content-length", b"content-type")
            ]
            return await reply(send, status, openai_error(status, held["body"]), keep)
        await send(message)

    return rewriting


def filtered_send(send, blocklist: Blocklist, stream: bool):
    """The response blocklist: a non-streamed answer that matches becomes a content_filter error
    (400); a stream ends at the event that completes a match (filters.StreamFilter)."""
    held: dict[str, Any] = {}
    err = error_body(
        400, "the response was stopped by this server's content filter", "content_filter", code="content_filter"
    )
    flt = StreamFilter(blocklist, err)

    async def filtered(message):
        if message["type"] == "http.response.start":
            if message["status"] >= 400:
                return await send(message)
            held["start"], held["body"] = message, b""
            return None
        if message["type"] != "http.response.body" or "start" not in held:
            return await send(message)
        if stream:  # pass events on as they come, minus a blocked tail
            if not held.get("started"):
                held["started"] = True
                await send(held["start"])
            return await send({**message, "body": flt.chunk(message.get("body", b""))})
        held["body"] += message.get("body", b"")
        if message.get("more_body", False):
            return None
        try:
            text = response_text(json.loads(held["body"]))
        except (json.JSONDecodeError, UnicodeDecodeError):
            text = ""
        if blocklist.hit(text):
            return await reply(send, 400, err)
        headers = [(k, v) for k, v in held["start"]["headers"] if k.lower() != b"content-length"]
        await send({**held["start"], "headers": headers + [(b"content-length", str(len(held["body"])).encode())]})
        await send({"type": "http.response.body", "body": held["body"]})

    return filtered


def openai_error(status: int, body: bytes) -> bytes:
    try:
        parsed = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        parsed = body.decode(errors="replace")
    etype = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        err = parsed["error"]
        if err.get("type") in OPENAI_ERROR_TYPES:
            return body
        # vLLM names errors after exception classes ("NotFoundError"); clients expect OpenAI's types
        return json.dumps({"error": {**err, "type": etype}}).encode()
    detail = parsed.get("detail", parsed) if isinstance(parsed, dict) else parsed
    return error_body(status, detail if isinstance(detail, str) else json.dumps(detail), etype)


async def reply(send, status: int, body: bytes, extra: list | None = None) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(extra or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
