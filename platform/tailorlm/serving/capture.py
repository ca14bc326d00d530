"""Traffic capture (serve.capture): what clients asked and what they got, for `tailorlm monitor`
and continual training, written as Parquet under `<run>/capture/`:

    requests/part-<utc>-<id>.parquet   one row per sampled generating request (REQUEST_FIELDS)
    feedback/part-<utc>-<id>.parquet   one row per POST /v1/feedback (FEEDBACK_FIELDS)
    shadow/part-<utc>-<id>.parquet     one row per request mirrored to serve.shadow (SHADOW_FIELDS)

Off the request path: a request only appends its body and the response bytes it was sent to an
in-memory queue (bounded by serve.capture.queue_rows; beyond, rows are dropped and counted). A
background task hands batches to a thread that parses the responses, redacts PII with the data
stage's redactor (data/pii.py) and any of this server's API keys pasted into the text, then
writes one file per batch (rotation: at most batch_rows rows per file, at least every flush_s).
A failing store never fails a request: its rows are dropped and counted in
`tailorlm_capture_rows{outcome="dropped_error"}`. The API key itself is never stored; a row
carries `key_hash`, the key's short digest id (keys.key_id), as the metrics and logs do.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import threading
import time
import uuid
from collections import deque
from typing import Any

from tailorlm.config import CaptureConfig
from tailorlm.serving import keys as api_keys
from tailorlm.serving.filters import response_text

log = logging.getLogger(__name__)

CAPTURE = "capture"  # the run folder's subfolder
REQUESTS, FEEDBACK, SHADOW = "requests", "feedback", "shadow"
REQUEST_FIELDS = (
    "id time route model version stream status latency_s prompt_tokens completion_tokens "
    "prompt_text messages answer key_hash user redacted"
).split()
FEEDBACK_FIELDS = "id time response_id score comment key_hash redacted".split()
SHADOW_FIELDS = "id time live_id model version status latency_s completion_tokens answer redacted".split()
FIELDS = {REQUESTS: REQUEST_FIELDS, FEEDBACK: FEEDBACK_FIELDS, SHADOW: SHADOW_FIELDS}
# column types, so that a batch whose column is all null still writes it as its type (a null-typed
# column in one file made the folder unreadable as one dataset)
TYPES = {"time": "float64", "latency_s": "float64", "score": "float64", "stream": "bool", "status": "int64",
         "prompt_tokens": "int64", "completion_tokens": "int64"}  # fmt: skip
KEY_TAG = "[API_KEY]"
# a token that could be a pasted API key: keys are URL-safe strings (letters, digits, - and _); a
# key glued to other such characters, or shorter than 8, is not found (only digests are known here)
_KEY_LIKE = re.compile(r"[A-Za-z0-9_\-]{8,}")
MAX_RESPONSE_BYTES = 1 << 20  # response bytes kept per request for parsing; a longer answer is cut


class CaptureWriter:
    """The queue and its writer. offer() is the only call on the request path."""

    def __init__(self, uri: str, cc: CaptureConfig, pii_kinds: list[str], key_digests: list[str]):
        import fsspec

        self.uri, self.cc, self.pii_kinds, self.key_digests = uri.rstrip("/"), cc, pii_kinds, set(key_digests)
        self.fs, self.root = fsspec.core.url_to_fs(self.uri)
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        self.pending: dict[str, deque] = {kind: deque() for kind in FIELDS}
        self.counts: dict[tuple[str, str], int] = {}  # (kind, outcome) -> rows: what the metric counts
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._lock = threading.Lock()  # one batch written at a time (the flusher thread, close())
        self._last_error_log = 0.0
        self._counter = _counter()

    # -- the request path -----------------------------------------------------------------------
    def sampled(self) -> bool:
        return self.cc.sample_rate >= 1 or random.random() < self.cc.sample_rate

    def offer(self, kind: str, row: dict[str, Any]) -> bool:
        """Queue a row; False (and counted) when the queue is full."""
        if sum(map(len, self.pending.values())) >= self.cc.queue_rows:
            self._count(kind, "dropped_full", 1)
            return False
        self.pending[kind].append(row)
        self._start()
        if len(self.pending[kind]) >= self.cc.batch_rows and self._wake is not None:
            self._wake.set()
        return True

    def _start(self) -> None:
        if self._task is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (a synchronous caller): close()/flush_sync() writes
                return
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._flusher())
            self._task.add_done_callback(self._flusher_ended)

    def _flusher_ended(self, task: asyncio.Task) -> None:
        """The flusher stopped (an error, the loop closing): say so, and let the next offer start
        another, so rows are not left to pile up unwritten."""
        if not task.cancelled() and task.exception() is not None:
            log.warning("capture: the writer task died (%r); starting another", task.exception())
        self._task = None

    # -- the writer -----------------------------------------------------------------------------
    async def _flusher(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.cc.flush_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            await asyncio.to_thread(self.flush_sync)

    def flush_sync(self) -> int:
        """Write every pending row (in batches of batch_rows); returns the rows written."""
        written = 0
        with self._lock:
            for kind, queue in self.pending.items():
                while queue:
                    batch = [queue.popleft() for _ in range(min(len(queue), self.cc.batch_rows))]
                    finished, bad = [], 0
                    for r in batch:  # one row that cannot be made fit drops itself, not its batch
                        try:
                            finished.append(self._finish(kind, r))
                        except Exception:  # noqa: BLE001
                            bad += 1
                    if bad:
                        self._count(kind, "dropped_error", bad)
                    try:
                        if finished:
                            self._write(kind, finished)
                        self._count(kind, "written", len(finished))
                        written += len(finished)
                    except Exception as exc:  # the store is down or refuses: drop, count, say so now and then
                        self._count(kind, "dropped_error", len(finished))
                        if time.time() - self._last_error_log > 60:
                            self._last_error_log = time.time()
                            log.warning("capture: %d %s rows dropped, the store failed: %s", len(finished), kind, exc)
        return written

    async def drain(self) -> int:
        """Write what is pending now (tests; a replica shutting down)."""
        return await asyncio.to_thread(self.flush_sync)

    def _write(self, kind: str, rows: list[dict[str, Any]]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        fields = FIELDS[kind]
        schema = pa.schema([(f, pa.type_for_alias(TYPES.get(f, "string"))) for f in fields])
        table = pa.Table.from_pylist([{f: r.get(f) for f in fields} for r in rows], schema=schema)
        folder = f"{self.root}/{kind}"
        name = f"part-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}.parquet"
        self.fs.makedirs(folder, exist_ok=True)
        # readers skip names starting with "_" (trainer.kept_files, pyarrow datasets): a local
        # file appears under its real name only once whole; an object store's PUT is whole anyway
        target = f"{folder}/_{name}" if self.local else f"{folder}/{name}"
        with self.fs.open(target, "wb") as fh:
            pq.write_table(table, fh)
        if self.local:
            self.fs.mv(target, f"{folder}/{name}")

    def _finish(self, kind: str, row: dict[str, Any]) -> dict[str, Any]:
        """The row as stored: the response parsed, every text redacted."""
        counts: dict[str, int] = {}
        if kind in (REQUESTS, SHADOW):
            raw = row.pop("_response", b"")
            rid, answer, usage = parse_response(raw, bool(row.get("stream")))
            row.update(id=rid or row.get("id"), answer=answer)
            if usage:
                row["prompt_tokens"] = usage.get("prompt_tokens", row.get("prompt_tokens"))
                row["completion_tokens"] = usage.get("completion_tokens")
            for field in ("prompt_text", "answer"):
                row[field] = self._clean(row.get(field), counts)
            if row.get("messages") is not None:
                row["messages"] = json.dumps(
                    [self._clean_message(m, counts) for m in row["messages"]], ensure_ascii=False
                )
            for field in ("user", "model"):  # client-chosen strings too
                row[field] = self._clean(row.get(field), counts)
        else:
            for field in ("comment", "response_id"):
                row[field] = self._clean(row.get(field), counts)
        row["redacted"] = json.dumps(counts, sort_keys=True)
        return row

    def _clean(self, text: str | None, counts: dict[str, int]) -> str | None:
        from tailorlm.data.pii import redact

        if text is None:
            return None
        if not isinstance(text, str):
            text = str(text)
        # a lone surrogate ("\ud800" is valid JSON) cannot be written as UTF-8: replaced, not fatal
        text = text.encode("utf-8", "replace").decode("utf-8")
        if self.key_digests:
            text = _KEY_LIKE.sub(lambda m: self._key_or_text(m.group(0), counts), text)
        text, found = redact(text, self.pii_kinds)
        for k, v in found.items():
            counts[k] = counts.get(k, 0) + v
        return text[: self.cc.max_text_chars]  # cut after redacting: a secret across the cut is gone whole

    def _key_or_text(self, token: str, counts: dict[str, int]) -> str:
        if api_keys.digest(token) in self.key_digests:
            counts["api_key"] = counts.get("api_key", 0) + 1
            return KEY_TAG
        return token

    def _clean_message(self, message: dict[str, Any], counts: dict[str, int]) -> dict[str, Any]:
        content = message.get("content")
        if isinstance(content, list):  # text parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return {"role": message.get("role"), "content": self._clean(content or "", counts)}

    def _count(self, kind: str, outcome: str, n: int) -> None:
        self.counts[(kind, outcome)] = self.counts.get((kind, outcome), 0) + n
        if self._counter is not None:
            self._counter.inc(n, tags={"kind": kind, "outcome": outcome})


def parse_response(raw: bytes, stream: bool) -> tuple[str | None, str | None, dict | None]:
    """(response id, answer text, usage) of a completions/chat response or its SSE stream."""
    if not raw:
        return None, None, None
    try:
        if not stream:
            body = json.loads(raw)
            return body.get("id"), response_text(body), body.get("usage")
        rid, parts, usage = None, [], None
        for line in raw.decode("utf-8", "replace").splitlines():
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            try:  # event by event: a cut last line (MAX_RESPONSE_BYTES) or one bad event loses only itself
                event = json.loads(line[5:])
            except json.JSONDecodeError:
                continue
            if not isinstance(event, dict):
                continue
            rid = rid or event.get("id")
            usage = event.get("usage") or usage
            parts.append(response_text(event))
        return rid, "".join(parts) if rid or parts else None, usage
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None, None, None


def recording_send(send, sink: dict[str, Any]):
    """send, also keeping the status and up to MAX_RESPONSE_BYTES of the body in sink."""
    sink.update(status=None, body=bytearray())

    async def recording(message):
        if message["type"] == "http.response.start":
            sink["status"] = message["status"]
        elif message["type"] == "http.response.body" and len(sink["body"]) < MAX_RESPONSE_BYTES:
            sink["body"] += message.get("body", b"")[: MAX_RESPONSE_BYTES - len(sink["body"])]
        await send(message)

    return recording


def _counter():
    try:
        from ray.util.metrics import Counter

        from tailorlm.metric_names import CAPTURE_ROWS

        return Counter(
            CAPTURE_ROWS,
            "captured rows by kind (requests, feedback) and outcome (written, dropped_full, dropped_error)",
            tag_keys=("kind", "outcome"),
        )
    except Exception:  # outside a Ray worker (unit tests): CaptureWriter.counts still counts
        return None
