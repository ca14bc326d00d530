"""Text normalization: HTML remnants, mojibake, control characters, Unicode NFKC, whitespace.

ftfy does the Unicode repair (mojibake, entities, control characters, NFKC) because it handles
far more broken-encoding cases than a hand-written pass would; we add HTML tag stripping and
whitespace rules. The original text stays in `raw_text` for audit.
"""

from __future__ import annotations

import html
import json
import re

import ftfy
import pandas as pd

_SCRIPT_STYLE = re.compile(r"<(script|style)\b[^>]*>.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9-]*(?:\s[^<>]{0,500})?/?>|<!--.*?-->", re.DOTALL)
_BLOCK_TAG = re.compile(r"</?(?:br|p|div|li|tr|h[1-6])\b[^>]*>", re.IGNORECASE)
_INVISIBLE = re.compile("[\u200b\u2060\ufeff]")  # zero-width space, word joiner, BOM; ftfy keeps them
_SPACES = re.compile(r"[ \t\u00a0\u3000]+")
_MANY_NEWLINES = re.compile(r"\n{3,}")


def normalize_text(text: str) -> str:
    if "<" in text:
        text = _SCRIPT_STYLE.sub(" ", text)
        text = _BLOCK_TAG.sub("\n", text)
        text = _TAG.sub(" ", text)
    if "&" in text:
        text = html.unescape(text)
    text = ftfy.fix_text(text, normalization="NFKC", unescape_html=False)
    text = _INVISIBLE.sub("", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _MANY_NEWLINES.sub("\n\n", "\n".join(lines)).strip()


def normalize_batch(batch: pd.DataFrame, enabled: bool = True) -> pd.DataFrame:
    """Normalize text (and each chat turn); rows left with no text are dropped as `empty`."""
    live = batch["reason"].isna()
    for i in batch.index[live]:
        msgs = batch.at[i, "messages"]
        if isinstance(msgs, str):
            turns = json.loads(msgs)
            if enabled:
                for t in turns:
                    t["content"] = normalize_text(t["content"])
            if any(not t["content"] for t in turns if t["role"] == "assistant") or not turns:
                batch.at[i, "reason"] = "empty"
            batch.at[i, "messages"] = json.dumps(turns, ensure_ascii=False)
            text = "\n".join(t["content"] for t in turns)
        else:
            text = normalize_text(batch.at[i, "text"]) if enabled else batch.at[i, "text"]
        batch.at[i, "text"] = text
        if not text.strip():
            batch.at[i, "reason"] = "empty"
    return batch
