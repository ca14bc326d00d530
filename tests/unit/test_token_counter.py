"""The data stage's token counter reads tokenizer.json with `tokenizers` directly; its counts must
be the ones transformers' tokenizer (what training uses) gives."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tailorlm.data.filters import TokenCounter
from tailorlm.demo_data import corpus_texts
from tailorlm.models import load_tokenizer, resolve_base


def test_counts_equal_transformers(tmp_path):
    from tailorlm.config import PipelineConfig

    path = resolve_base(PipelineConfig().model)
    fast, reference = TokenCounter(path), load_tokenizer(path)
    assert fast.fast is not None  # the factory model's folder has tokenizer.json
    texts = corpus_texts()[:200] + ["", " ", "日本語のテキスト", "a" * 5000]

    def ref(batch):
        return [len(ids) for ids in reference(batch, add_special_tokens=False)["input_ids"]]

    assert fast(texts) == ref(texts)

    @settings(max_examples=150, deadline=None)
    @given(st.lists(st.text(max_size=60), min_size=1, max_size=8))
    def same(batch):
        assert fast(batch) == ref(batch)

    same()
