"""Perplexity filter: drop documents a reference causal LM finds too surprising (CCNet-style).

CCNet scores with a KenLM model trained on Wikipedia; we score with any Hugging Face causal LM
(`data.filters.perplexity_model`, default the pipeline's base model), loaded through the same
path as training, so a small real model (e.g. Qwen2.5-0.5B) works on a cluster and the tiny
factory model works in tests. It holds a model, so it is an actor class (one per worker).
Rows get `perplexity`; the check runs only on rows no earlier step dropped.
"""

from __future__ import annotations

import math

import pandas as pd

from tailorlm.config import FilterConfig


class PerplexityFilter:
    def __init__(self, cfg: dict, model_path: str, batch_size: int = 8) -> None:
        import torch

        from tailorlm.models import load_model, load_tokenizer

        self.cfg = FilterConfig.model_validate(cfg)
        self.tok = load_tokenizer(model_path)
        self.model = load_model(model_path, dtype="float32").eval()
        self.batch_size = batch_size
        self.torch = torch

    def scores(self, texts: list[str]) -> list[float]:
        """Per-document perplexity over its first perplexity_max_tokens tokens (padded batches)."""
        torch, out = self.torch, []
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        for start in range(0, len(texts), self.batch_size):
            ids = [
                x[: self.cfg.perplexity_max_tokens]
                for x in self.tok(texts[start : start + self.batch_size], add_special_tokens=False)["input_ids"]
            ]
            width = max(2, max(map(len, ids)))
            batch = torch.full((len(ids), width), pad, dtype=torch.long)
            mask = torch.zeros((len(ids), width), dtype=torch.long)
            for r, x in enumerate(ids):
                batch[r, : len(x)] = torch.tensor(x, dtype=torch.long)
                mask[r, : len(x)] = 1
            with torch.inference_mode():
                logits = self.model(input_ids=batch, attention_mask=mask).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
            weights = mask[:, 1:].float()
            for r in range(len(ids)):
                n = weights[r].sum().item()
                out.append(math.exp((nll[r] * weights[r]).sum().item() / n) if n else math.inf)
        return out

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        batch["perplexity"] = math.nan  # a float column in every batch (NaN: not scored)
        idx = list(batch.index[batch["reason"].isna()])
        if idx:
            for i, ppl in zip(idx, self.scores(batch.loc[idx, "text"].tolist())):
                batch.at[i, "perplexity"] = ppl
                if ppl > self.cfg.max_perplexity:
                    batch.at[i, "reason"] = "perplexity:too_high"
        return batch
