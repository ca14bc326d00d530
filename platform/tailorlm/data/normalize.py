"""Text normalization: HTML remnants, mojibake, control characters, Unicode NFKC, whitespace.

ftfy does the Unicode repair (mojibake, entities, control characters, NFKC) because it handles
far more broken-encoding cases than a hand-written pass would; we add HTML tag stripping and
whitespace rules. The original text stays in `raw_text` for audit.
"""

from __future__ import annotations

import html
import json
import re
import unicodedata

import ftfy
import pandas as pd
from ftfy import fixes

_SCRIPT_STYLE = re.compile(r"<(script|style)\b[^>]*>.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9-]*(?:\s[^<>]{0,500})?/?>|<!--.*?-->", re.DOTALL)
_BLOCK_TAG = re.compile(r"</?(?:br|p|div|li|tr|h[1-6])\b[^>]*>", re.IGNORECASE)
_INVISIBLE = re.compile("[\u200b\u2060\ufeff]")  # zero-width space, word joiner, BOM; ftfy keeps them
_SPACES = re.compile(r"[ \t\u00a0\u3000]+")
_MANY_NEWLINES = re.compile(r"\n{3,}")


# Text made only of these characters has nothing for ftfy's mojibake repair: every mojibake
# sequence holds the image of a UTF-8 lead byte (U+00C2..U+00F4 in Latin-1 and cp1252, Cyrillic
# letters in cp1251, ...) or, in MacRoman, of a continuation byte (Latin-1 letters and symbols),
# and none of those is here. What ftfy still does to such text is done by `repair`'s fast path.
SAFE_TEXT = re.compile(
    "[\x00-\x7f\u2018\u2019\u201c\u201d\u2013\u2014\u2026"
    "\u3000-\u303f\u3040-\u30ff\u4e00-\u9fff\uac00-\ud7a3\uff01-\uff5e]*"
)
_LINES = re.compile(r"[^\n]*\n|[^\n]+")  # ftfy's segments: up to and including each "\n"
_WIDE = re.compile("[\u3000\uff01-\uff5e]")  # what fix_character_width changes in SAFE_TEXT
_CONTROL = re.compile("[" + "".join(re.escape(chr(c)) for c in sorted(fixes.CONTROL_CHARS)) + "]")


def repair(text: str) -> str:
    """ftfy's repair with NFKC. ftfy's full pass was the data stage's largest per-row cost (about
    10 ms per web document here, mostly its per-character translate tables and its mojibake
    heuristics), while most web text is ASCII plus curly quotes and dashes, or CJK. On such text
    (SAFE_TEXT) only the fixes that can change it run, each one only where its characters occur;
    a property test checks the result equals ftfy's for every such text."""
    if SAFE_TEXT.fullmatch(text):
        return _repair_safe(text)
    # ftfy repairs each line on its own (its segments end at "\n"), so only the lines outside
    # SAFE_TEXT need its full pass
    return "".join(_repair_safe(line) if SAFE_TEXT.fullmatch(line) else _ftfy(line) for line in _LINES.findall(text))


def _ftfy(text: str) -> str:
    return ftfy.fix_text(text, normalization="NFKC", unescape_html=False)


def _repair_safe(text: str) -> str:
    while True:  # ftfy's own loop: its fixes in its order, until nothing changes
        before = text
        if _WIDE.search(text):
            text = fixes.fix_character_width(text)
        if not text.isascii():
            text = fixes.uncurl_quotes(text)
        if "\r" in text:
            text = fixes.fix_line_breaks(text)
        if "\x1b" in text:
            text = fixes.remove_terminal_escapes(text)
        if _CONTROL.search(text):
            text = fixes.remove_control_chars(text)
        if not text.isascii():
            text = unicodedata.normalize("NFKC", text)
        if text == before:
            return text


def normalize_text(text: str) -> str:
    if "<" in text:
        text = _SCRIPT_STYLE.sub(" ", text)
        text = _BLOCK_TAG.sub("\n", text)
        text = _TAG.sub(" ", text)
    if "&" in text:
        text = html.unescape(text)
    text = repair(text)
    text = _INVISIBLE.sub("", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _MANY_NEWLINES.sub("\n\n", "\n".join(lines)).strip()


def normalize_batch(batch: pd.DataFrame, enabled: bool = True) -> pd.DataFrame:
    """Normalize text (and each chat turn); rows left with no text are dropped as `empty`."""
    live = batch["reason"].isna().to_numpy()
    texts, msgs, reasons = batch["text"].tolist(), batch["messages"].tolist(), batch["reason"].tolist()
    for i in live.nonzero()[0]:
        if isinstance(msgs[i], str):
            turns = json.loads(msgs[i])
            if enabled:
                for t in turns:
                    t["content"] = normalize_text(t["content"])
            if any(not t["content"] for t in turns if t["role"] == "assistant") or not turns:
                reasons[i] = "empty"
            msgs[i] = json.dumps(turns, ensure_ascii=False)
            texts[i] = "\n".join(t["content"] for t in turns)
        elif enabled:
            texts[i] = normalize_text(texts[i])
        if not texts[i].strip():
            reasons[i] = "empty"
    batch["text"], batch["messages"], batch["reason"] = texts, msgs, reasons
    return batch
