"""Model evaluation on the eval split: perplexity, and answer quality for SFT rows with references.

Answer metrics follow SQuAD's conventions (exact match and token F1 after lowercasing and
stripping punctuation and articles) plus ROUGE-L from Google's rouge-score package. Those score
the whole reply, and a templated reply ("The capital of X is Y.") earns most of its F1 from the
template alone. `fact_exact_match` scores the fact: the reply's content words that the question
does not already contain (the answer span, as extractive QA would mark it) must equal the
reference's. It needs no annotated answer span, so it works on any question/answer data.
"""

from __future__ import annotations

import json
import math
import re
import string
import unicodedata
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


# Function words a reply adds around its fact ("X has a cold climate" for "Which climate does X
# have?"): not part of the fact. Small on purpose: content words must never be dropped.
_FUNCTION_WORDS = frozenset(
    "is are was were be has have had does do did of on in at to for by with and or its it his her their this "
    "that there which what who how many much called named".split()
)


def _stem(w: str) -> str:
    """A crude plural/verb-form fold (moons/moon, exports/export), enough to tell a question's
    word from a new one; not a linguistic stemmer."""
    return w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w


_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_WORD = re.compile(f"[{_CJK}]|[^\\s{_CJK}]+")
_POSSESSIVE = re.compile(r"['\u2019]s\b")


def fact_words(s: str) -> list[str]:
    """Words for the fact metric: lowercased, possessives and articles dropped, any Unicode
    punctuation removed, and CJK text split into characters (it has no spaces; MLQA-style
    scoring does the same)."""
    s = _POSSESSIVE.sub("", s.lower())
    s = "".join(" " if unicodedata.category(c).startswith("P") else c for c in s)
    return [w for w in _WORD.findall(s) if w not in ("a", "an", "the")]


def answer_fact(question: str, answer: str) -> tuple[str, ...]:
    """The fact an answer states: its words, in order, that are neither in the question nor
    function words. ("What is the capital of Daleglen?", "The capital of Daleglen is
    Ashfordwood.") -> ("ashfordwood",)."""
    asked = {_stem(w) for w in fact_words(question)}
    return tuple(w for w in fact_words(answer) if _stem(w) not in asked and w not in _FUNCTION_WORDS)


def fact_correct(question: str, pred: str, ref: str) -> bool | None:
    """The prediction states exactly the reference's fact; None when the reference adds no word to
    the question (nothing to score)."""
    fact = answer_fact(question, ref)
    return answer_fact(question, pred) == fact if fact else None


def token_f1(pred: str, ref: str) -> float:
    p, r = normalize_answer(pred).split(), normalize_answer(ref).split()
    common = sum((Counter(p) & Counter(r)).values())
    if not p or not r or not common:
        return float(p == r)
    prec, rec = common / len(p), common / len(r)
    return 2 * prec * rec / (prec + rec)


def answer_metrics(questions: list[str], preds: list[str], refs: list[str]) -> dict[str, float]:
    from rouge_score import rouge_scorer

    if not refs:
        return {}
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    n = len(refs)
    facts = [c for c in map(fact_correct, questions, preds, refs) if c is not None]
    out: dict[str, float] = {
        "exact_match": sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(preds, refs)) / n,
        "f1": sum(token_f1(p, r) for p, r in zip(preds, refs)) / n,
        "rouge_l": sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)) / n,
        "answered": n,
    }
    if facts:
        out["fact_exact_match"] = sum(facts) / len(facts)
        out["fact_scored"] = len(facts)  # questions whose reference states a fact (the denominator)
    return out


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
    questions = [p[-1]["content"] for p in prompts]
    result: dict[str, Any] = {"eval_loss": loss, "perplexity": perplexity(loss), "eval_tokens": n_tok}
    result.update(answer_metrics(questions, preds, refs))
    # every answer, so the stage can set base and finetuned side by side (train/stage.answer_table)
    result["samples"] = [{"prompt": q, "reference": r, "answer": a} for q, r, a in zip(questions, refs, preds)]
    return result


def answer_table(base: dict[str, Any], finetuned: dict[str, Any], n: int = 8) -> list[dict[str, Any]]:
    """Base and finetuned answers to the same eval questions, with the fact and whether each
    states it: the table eval.json, the recap and the report show. Questions whose fact the
    finetuned model gets right and the base does not come first (what finetuning changed), then
    the others, so a table of n rows shows both successes and failures when there are any."""
    base_by_q = {s["prompt"]: s["answer"] for s in base.get("samples", [])}
    rows = []
    for s in finetuned.get("samples", []):
        q, ref = s["prompt"], s["reference"]
        before = base_by_q.get(q, "")
        rows.append(
            {
                "question": q,
                "reference": ref,
                "fact": " ".join(answer_fact(q, ref)),
                "base": before,
                "finetuned": s["answer"],
                "base_correct": bool(fact_correct(q, before, ref)),
                "finetuned_correct": bool(fact_correct(q, s["answer"], ref)),
            }
        )
    rows = [r for r in rows if r["fact"]]  # nothing to score: no mark to show
    learned = [r for r in rows if r["finetuned_correct"] and not r["base_correct"]]
    wrong = [r for r in rows if not r["finetuned_correct"]]
    rest = [r for r in rows if r["finetuned_correct"] and r["base_correct"]]
    # up to a quarter of the table for failures when there are successes to show, then fill up
    first = learned[: n - min(len(wrong), n // 4)] + wrong[: n // 4]
    return (first + [r for r in learned + wrong + rest if r not in first])[:n]
