"""Training examples: plain text (causal LM) and SFT (chat template, loss on assistant tokens only).

SFT labels come from character spans: the template renders each conversation prefix, and the
tokens whose offsets fall inside an assistant turn (after its generation prompt, through its end
marker) carry loss. This works for any template that renders prefixes consistently (ChatML,
Llama 3, Qwen), without `{% generation %}` markers in the template.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

IGNORE = -100


def assistant_spans(tokenizer, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans the model must learn to produce."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)) if i else 0
        end = len(tokenizer.apply_chat_template(messages[: i + 1], tokenize=False))
        spans.append((start, end))
    return text, spans


def encode_sft(tokenizer, messages: list[dict[str, str]], max_len: int) -> tuple[list[int], list[int]]:
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [IGNORE] * len(ids)
    for k, (s, e) in enumerate(enc["offset_mapping"]):
        if any(a <= s < b for a, b in spans) and e > s:
            labels[k] = ids[k]
    return ids[:max_len], labels[:max_len]


def encode_text(tokenizer, text: str, max_len: int) -> tuple[list[int], list[int]]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = ids[:max_len]
    return ids, list(ids)


def pack(rows: list[tuple[list[int], list[int]]], max_len: int) -> list[tuple[list[int], list[int]]]:
    """Greedy packing of whole examples into sequences of at most max_len tokens."""
    out, cur_ids, cur_lab = [], [], []
    for ids, labels in rows:
        if cur_ids and len(cur_ids) + len(ids) > max_len:
            out.append((cur_ids, cur_lab))
            cur_ids, cur_lab = [], []
        cur_ids, cur_lab = cur_ids + ids, cur_lab + labels
    if cur_ids:
        out.append((cur_ids, cur_lab))
    return out


# tokenizer classes load_tokenizer's AutoTokenizer resolves to themselves (the factory models' own)
LIGHT_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer_light(path: str, chat_template: str | None = None):
    """tailorlm.models.load_tokenizer, the same tokenizer, without importing AutoTokenizer where its
    tokenizer_config names one of LIGHT_TOKENIZER_CLASSES: transformers' auto module imports torch
    and the model and generation code (~4 s of a driver's prepare that needs none of it); the class
    itself loads in well under a second. Any other tokenizer goes through load_tokenizer."""
    import json
    import os

    from tailorlm.models import finish_tokenizer, load_tokenizer, local_model

    folder = local_model(path)
    try:
        with open(os.path.join(folder, "tokenizer_config.json")) as fh:
            name = json.load(fh).get("tokenizer_class")
    except (OSError, ValueError):
        name = None
    if name not in LIGHT_TOKENIZER_CLASSES:
        return load_tokenizer(path, chat_template)
    import transformers

    return finish_tokenizer(getattr(transformers, name).from_pretrained(folder), chat_template)


class Tokenize:
    """Ray Data callable: normalized rows -> input_ids / labels (a class: it holds the tokenizer)."""

    def __init__(
        self, tokenizer_path: str, fmt: str, max_len: int, packing: bool, chat_template: str | None = None
    ) -> None:
        self.tok = load_tokenizer_light(tokenizer_path, chat_template)
        self.fmt, self.max_len, self.packing = fmt, max_len, packing

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        rows = []
        for text, msgs in zip(batch["text"], batch["messages"]):
            if self.fmt != "text" and isinstance(msgs, str):
                rows.append(encode_sft(self.tok, json.loads(msgs), self.max_len))
            elif self.fmt != "sft":
                rows.append(encode_text(self.tok, text, self.max_len))
        rows = [r for r in rows if sum(label != IGNORE for label in r[1]) > 0]  # nothing to learn: skip
        if self.packing:
            rows = pack(rows, self.max_len)
        return pd.DataFrame(
            {
                "input_ids": [np.asarray(i, dtype=np.int32) for i, _ in rows],
                "labels": [np.asarray(labels, dtype=np.int32) for _, labels in rows],
                "n_tokens": [len(i) for i, _ in rows],
            }
        )


def collate(batch: dict[str, Any], pad_id: int) -> dict[str, Any]:
    """Pad a batch of variable-length rows; padding is masked out of attention and loss."""
    import torch

    ids, labels = list(batch["input_ids"]), list(batch["labels"])
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    label_t = torch.full((len(ids), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for r, (i, lab) in enumerate(zip(ids, labels)):
        input_ids[r, : len(i)] = torch.as_tensor(i)
        label_t[r, : len(lab)] = torch.as_tensor(lab)
        mask[r, : len(i)] = 1
    return {"input_ids": input_ids, "labels": label_t, "attention_mask": mask}
