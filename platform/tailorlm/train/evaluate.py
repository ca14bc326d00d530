"""Model evaluation on the eval split: perplexity, and answer quality for SFT rows with references.

Answer metrics follow SQuAD's conventions (exact match and token F1 after lowercasing and
stripping punctuation and articles) plus ROUGE-L from Google's rouge-score package.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections import Counter
from typing import Any

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def perplexity(loss: float) -> float:
    """exp(mean token loss), capped so that an untrained model's loss does not overflow."""
    return math.exp(min(loss, 50))


def token_loss(model, encoded: list[tuple[list[int], list[int]]]) -> tuple[float, int]:
    """(mean loss per learned token, number of such tokens) of a causal LM over encoded rows
    (input ids, labels with IGNORE where nothing is learned): the one evaluation loss of the
    train stage's report and the export stage's quality gate (the training loop computes the
    same quantity over its Ray Data shard, batched and summed across workers)."""
    import torch

    from tailorlm.train.formats import IGNORE

    loss_sum, n_tok = 0.0, 0
    with torch.no_grad():
        for ids, labels in encoded:
            n = sum(label != IGNORE for label in labels[1:])
            if n:
                loss_sum += model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item() * n
                n_tok += n
    return loss_sum / max(1, n_tok), n_tok


def normalize_answer(s: str) -> str:
    s = "".join(c for c in s.lower() if c not in set(string.punctuation))
    return " ".join(_ARTICLES.sub(" ", s).split())


def token_f1(pred: str, ref: str) -> float:
    p, r = normalize_answer(pred).split(), normalize_answer(ref).split()
    common = sum((Counter(p) & Counter(r)).values())
    if not p or not r or not common:
        return float(p == r)
    prec, rec = common / len(p), common / len(r)
    return 2 * prec * rec / (prec + rec)


def answer_metrics(preds: list[str], refs: list[str]) -> dict[str, float]:
    from rouge_score import rouge_scorer

    if not refs:
        return {}
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    n = len(refs)
    return {
        "exact_match": sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(preds, refs)) / n,
        "f1": sum(token_f1(p, r) for p, r in zip(preds, refs)) / n,
        "rouge_l": sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)) / n,
    }


def load_for_eval(model_path: str, adapter_path: str | None = None):
    """A model folder, or a base plus a LoRA adapter folder."""
    from tailorlm.models import load_adapter, load_model

    model = load_model(model_path, dtype="float32")
    if adapter_path:
        model = load_adapter(model, adapter_path)
    return model.eval()


def evaluate_model(
    model_path: str,
    tokenizer_path: str,
    rows: list[dict[str, Any]],
    max_len: int,
    adapter_path: str | None = None,
    max_generations: int = 64,
    max_new_tokens: int = 48,
    chat_template: str | None = None,
) -> dict[str, Any]:
    """Perplexity over all eval rows (loss on the tokens training would learn) and, for chat rows,
    greedy answers scored against the reference reply."""
    import torch

    from tailorlm.models import load_tokenizer
    from tailorlm.train.formats import IGNORE, encode_sft, encode_text

    tok = load_tokenizer(tokenizer_path, chat_template)
    model = load_for_eval(model_path, adapter_path)
    encoded, prompts, refs = [], [], []
    for row in rows:
        msgs = json.loads(row["messages"]) if isinstance(row.get("messages"), str) else None
        ids, labels = encode_sft(tok, msgs, max_len) if msgs else encode_text(tok, row["text"], max_len)
        if sum(label != IGNORE for label in labels[1:]) == 0:
            continue
        encoded.append((ids, labels))
        if msgs and msgs[-1]["role"] == "assistant" and len(prompts) < max_generations:
            prompts.append(msgs[:-1])
            refs.append(msgs[-1]["content"])
    loss, n_tok = token_loss(model, encoded)
    with torch.no_grad():
        preds = []
        for msgs in prompts:
            enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            preds.append(tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    result: dict[str, Any] = {"eval_loss": loss, "perplexity": perplexity(loss), "eval_tokens": n_tok}
    result.update(answer_metrics(preds, refs))
    result["samples"] = [
        {"prompt": p[-1]["content"], "reference": r, "answer": a} for p, r, a in list(zip(prompts, refs, preds))[:5]
    ]
    return result
