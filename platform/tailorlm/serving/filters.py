"""Content filters on what the model sees and what it says, whichever route carries it.

The prompt blocklist runs on every piece of text the engine will see (all message roles and
names, every prompt of a list, the detokenized form of token-id prompts); the response blocklist
on the text of every choice, streamed or not. Both match a normalized form of the text, so that
invisible or look-alike characters do not walk a word past the filter:
- NFKC folds compatibility forms (full-width letters, ligatures, superscripts) to plain ones;
- characters of Unicode category Cf (zero-width space/joiner, soft hyphen, bidi controls) and
  combining marks are removed;
- control characters other than tab and newlines are removed too;
- a pattern also runs on a look-alike skeleton: every letter Unicode's confusables table
  (UTS #39 data, shipped by the MIT-licensed confusable_homoglyphs package) lists as confusable
  with one ASCII letter or digit becomes it (Cyrillic "с" -> "c", Greek "ρ" -> "p"), then
  anyascii transliterates what is left (anyascii alone goes by sound: "с" -> "s"). The unfolded
  text is checked too, so a pattern in Chinese or any other script matches as written.

Streams are checked incrementally: each event re-checks only the choices it extends, over the
last STREAM_WINDOW characters, so the work grows linearly with the stream (a match must lie
within that window: a pattern spanning more characters is not caught in streams).
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
from importlib import resources
from typing import Any, Callable, Iterable

from anyascii import anyascii

STREAM_WINDOW = 512
_DROPPED = {"Cf", "Mn", "Me", "Cc"}


@functools.cache
def _lookalikes() -> dict[int, str]:
    """Non-ASCII character -> the ASCII letter or digit it is confusable with."""
    table = json.loads(resources.files("confusable_homoglyphs").joinpath("confusables.json").read_text("utf-8"))
    out = {}
    for ch, glyphs in table.items():
        if len(ch) == 1 and not ch.isascii():
            ascii_ = [g["c"] for g in glyphs if len(g["c"]) == 1 and g["c"].isascii() and g["c"].isalnum()]
            if ascii_:
                out[ord(ch)] = ascii_[0]
    return out


def normalized_forms(text: str) -> tuple[str, str]:
    """(normalized text, its look-alike skeleton): the forms every pattern is matched against."""
    folded = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", text))
    kept = "".join(ch for ch in folded if unicodedata.category(ch) not in _DROPPED or ch in "\t\n\r")
    clean = unicodedata.normalize("NFKC", kept)
    return clean, anyascii(clean.translate(_lookalikes()))


class Blocklist:
    def __init__(self, patterns: Iterable[str]):
        self.patterns = [re.compile(p, flags=re.IGNORECASE) for p in patterns]

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def hit(self, text: str) -> bool:
        if not self.patterns or not text:
            return False
        forms = (text, *normalized_forms(text))
        return any(p.search(f) for p in self.patterns for f in forms)


def _content_text(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):  # content parts; the request schema admits text parts only
        parts = [part.get("text", "") for part in content if isinstance(part, dict)]
        # the engine sees the parts joined: with "\n" (string-format chat templates) or with nothing
        # (templates that loop over parts), so a phrase split across parts is checked whole
        return parts + ["\n".join(parts), "".join(parts)] if len(parts) > 1 else parts
    return []


def prompt_texts(body: dict[str, Any], detokenize: Callable[[list[int]], str] | None) -> list[str]:
    """Every text the engine will see for a validated completions or chat body."""
    texts: list[str] = []
    for message in body.get("messages") or []:
        texts += _content_text(message.get("content"))
        if message.get("name"):
            texts.append(message["name"])
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        texts.append(prompt)
    elif isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            texts += prompt
        else:  # token ids: one prompt (list[int]) or several (list[list[int]])
            lists = [prompt] if isinstance(prompt[0], int) else prompt
            if detokenize is not None:
                texts += [detokenize(ids) for ids in lists]
    return texts


def response_text(body: Any) -> str:
    """The generated text in a completions/chat response or stream chunk (all choices)."""
    parts: list[str] = []
    for choice in (body.get("choices") or []) if isinstance(body, dict) else []:
        if not isinstance(choice, dict):
            continue
        parts.append(choice.get("text") or "")
        for key in ("message", "delta"):
            if isinstance(choice.get(key), dict):
                for field in ("content", "reasoning", "reasoning_content", "refusal"):
                    value = choice[key].get(field)
                    parts.append(value if isinstance(value, str) else "")
    return "".join(p for p in parts if isinstance(p, str))


class StreamFilter:
    """The response blocklist over an SSE stream: text accumulates per choice index over the
    events; at a match the event is withheld and the stream ends with a content_filter error
    event and `data: [DONE]` (what was already sent stays sent)."""

    def __init__(self, blocklist: Blocklist, error_event: bytes):
        self.blocklist, self.error_event = blocklist, error_event
        self.tail: dict[int, str] = {}  # per choice: the last STREAM_WINDOW characters seen
        self.buffer, self.blocked = b"", False

    def chunk(self, data: bytes) -> bytes:
        """Filtered bytes to pass on for one body chunk of the stream."""
        if self.blocked:
            return b""
        self.buffer += data
        out = b""
        while b"\n\n" in self.buffer:
            event, self.buffer = self.buffer.split(b"\n\n", 1)
            payload = event[5:].strip() if event.startswith(b"data:") else b""
            if payload and payload != b"[DONE]":
                try:
                    parsed = json.loads(payload)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    parsed = {}
                touched = []
                for choice in parsed.get("choices") or [] if isinstance(parsed, dict) else []:
                    if isinstance(choice, dict):
                        idx = choice.get("index", 0) if isinstance(choice.get("index", 0), int) else 0
                        new = response_text({"choices": [choice]})
                        if new:
                            window = self.tail.get(idx, "")[-STREAM_WINDOW:] + new
                            self.tail[idx] = window
                            touched.append(idx)
                if any(self.blocklist.hit(self.tail[idx]) for idx in touched):
                    self.blocked = True
                    return out + b"data: " + self.error_event + b"\n\ndata: [DONE]\n\n"
            out += event + b"\n\n"
        return out
