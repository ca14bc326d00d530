"""Data steps without Ray: reading, normalization, filters, PII, MinHash, dedup grouping."""

import gzip
import json

import numpy as np
import pandas as pd
import pytest

from tailorlm.config import FilterConfig, SourceConfig
from tailorlm.data import dedup
from tailorlm.data.filters import check_quality
from tailorlm.data.minhash import band_keys, estimated_jaccard, signatures, token_hashes, tokens, true_jaccard
from tailorlm.data.normalize import normalize_text
from tailorlm.data.pii import cn_id_ok, luhn_ok, redact
from tailorlm.data.read import SourceError, expand_source, parse_file

ALL_PII = ["email", "phone", "ip", "credit_card", "id_number"]


# ----------------------------------------------------------------------------- read
def test_parse_jsonl_keeps_every_line_with_reasons():
    data = b"\n".join(
        [
            json.dumps({"id": "a", "text": "hello"}).encode(),
            b'{"text": "broken',
            b"\xff\xfe not utf8",
            json.dumps({"text": None}).encode(),
            json.dumps({"instruction": "Q?", "input": "", "output": "A."}).encode(),
            json.dumps({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}).encode(),
            json.dumps([1, 2]).encode(),
        ]
    )
    rows = list(parse_file(data, "/x/f.jsonl", "jsonl", "auto"))
    assert [r["reason"] for r in rows] == [
        None,
        "malformed_json",
        "invalid_utf8",
        "missing_text",
        None,
        None,
        "malformed_record",
    ]
    assert rows[0]["id"] == "a" and rows[1]["id"] == "/x/f.jsonl#1"
    assert rows[4]["kind"] == "alpaca" and json.loads(rows[4]["messages"])[1] == {"role": "assistant", "content": "A."}
    assert rows[5]["kind"] == "chat" and json.loads(rows[5]["messages"])[0]["role"] == "user"


def test_parse_gzip_and_json_array_and_text():
    gz = gzip.compress(b'{"text": "one"}\n{"text": "two"}\n')
    assert [r["text"] for r in parse_file(gz, "f.jsonl.gz", "jsonl", "auto")] == ["one", "two"]
    arr = json.dumps([{"instruction": "i", "output": "o"}]).encode()
    assert next(parse_file(arr, "f.json", "json", "auto"))["kind"] == "alpaca"
    assert [r["text"] for r in parse_file(b"l1\n\nl2\n", "f.txt", "text", "auto")] == ["l1", "l2"]
    with pytest.raises(SourceError, match="not a valid JSON"):
        list(parse_file(b"[{", "f.json", "json", "auto"))


def test_expand_source_errors(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        expand_source(SourceConfig(path=str(tmp_path / "missing.jsonl")))
    (tmp_path / "a.docx").write_text("x")
    with pytest.raises(SourceError, match="unsupported file type"):
        expand_source(SourceConfig(path=str(tmp_path / "a.docx")))
    with pytest.raises(SourceError, match="matches no files"):
        expand_source(SourceConfig(path=str(tmp_path / "*.jsonl")))
    (tmp_path / "b.jsonl").write_text("{}\n")
    (tmp_path / "c.parquet").write_text("")
    assert [p.rsplit("/", 1)[-1] for p in expand_source(SourceConfig(path=str(tmp_path)))] == ["b.jsonl", "c.parquet"]


# ----------------------------------------------------------------------------- normalize / filters
def test_normalize_text():
    raw = "<p>Caf\u00e9&nbsp;menu</p><script>x()</script>\u200b  ﬁne\t\tthing\r\n\n\n\nend\x07"
    assert normalize_text(raw) == "Café menu\nfine thing\n\nend"


def test_quality_heuristics():
    cfg = FilterConfig(quality_min_words=5)
    good = "The river runs to the sea and the town has a market with fresh bread every morning of the week."
    assert check_quality(good, cfg, "en") is None
    assert check_quality("$$$ ### %%% &&& *** $$$ ### %%%", cfg, "en") == "quality:symbols"
    assert check_quality("\n".join(["same line here"] * 5 + ["other"]), cfg, "en") == "quality:duplicate_lines"
    rep = "buy cheap pills now " * 20
    assert check_quality(rep, cfg, "en") == "quality:repeated_ngrams"
    assert (
        check_quality("Pneumonoultramicroscopicsilicovolcanoconiosis antidisestablishmentarianism", cfg, "en")
        == "quality:word_length"
    )
    assert check_quality("river runs sea town market bread morning week fresh stone", cfg, "en") == "quality:stopwords"
    # CJK text is not judged by word-level rules
    assert check_quality("泽菲尔星表中的一颗行星。这里的天空是红色的，它有三颗卫星。", cfg, "zh") is None


def test_pii_redaction_validates_checksums():
    text = (
        "mail a.b@x.org, call (415) 555-0132 or 13812345678, ip 10.0.0.1. card 4111 1111 1111 1111 "
        "but not 4111 1111 1111 1112; id 11010519491231002X; ssn 123-45-6789"
    )
    out, counts = redact(text, ALL_PII)
    assert counts == {"email": 1, "phone": 2, "ip": 1, "credit_card": 1, "id_number": 2}
    assert "4111 1111 1111 1112" in out and "a.b@x.org" not in out and "[IP]." in out
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert cn_id_ok("11010519491231002X") and not cn_id_ok("110105194912310021")
    assert redact("version 1.2.3.4.5 and 999.1.1.1", ALL_PII)[1] == {}
    assert redact("mail a@b.co", ["phone"])[1] == {}


# ----------------------------------------------------------------------------- minhash
def _words(rng, n):
    vocab = [f"w{i}" for i in range(3000)]
    return [vocab[i] for i in rng.integers(0, len(vocab), n)]


def test_minhash_estimates_jaccard_and_is_deterministic():
    rng = np.random.default_rng(0)
    base = _words(rng, 200)
    edited = base.copy()
    edited[50:60] = _words(rng, 10)
    texts = [" ".join(base), " ".join(edited), " ".join(_words(rng, 200)), "", "CASE and, punctuation!"]
    s1 = signatures(texts + ["case AND punctuation"])
    s2 = signatures(texts + ["case AND punctuation"])
    assert (s1 == s2).all() and s1.dtype == np.uint32
    true = true_jaccard(texts[0], texts[1])
    assert abs(estimated_jaccard(s1[0], s1[1]) - true) < 0.1
    assert estimated_jaccard(s1[0], s1[2]) < 0.05
    assert (s1[3] == 0xFFFFFFFF).all()  # no tokens: never joins a bucket
    assert estimated_jaccard(s1[4], s1[5]) == 1.0  # case and punctuation do not matter


def test_vectorized_tokens_match_the_python_reference():
    texts = [
        "Café naïve RÉSUMÉ, 2024: snake_case x-ray!",
        "",
        "   ",
        "!!!",
        "a",
        "泽菲尔星表中的一颗行星。这里的天空是红色的，它有3颗卫星",
        "日本語のテキストです。カタカナ",
        "한국어 텍스트 입니다",
        "mostly english words with 一点 中文",
        "tabs\tand\nnewlines  here",
    ]
    hashes, lens, cjk = token_hashes(texts)
    ref = [tokens(t) for t in texts]
    assert lens.tolist() == [len(t) for t, _ in ref] and cjk.tolist() == [c for _, c in ref]
    flat = [tok for t, _ in ref for tok in t]
    assert hashes.tolist() == pd.util.hash_array(np.asarray(flat, dtype=object)).tolist()


def test_exact_jaccard_matches_shingle_sets():
    from tailorlm.data.minhash import exact_jaccard, shingle_hashes

    rng = np.random.default_rng(1)
    base = _words(rng, 80)
    a = [" ".join(base), " ".join(base), "", "one two", "泽菲尔星表中的一颗行星", " ".join(_words(rng, 80))]
    b = [" ".join(base[:70] + _words(rng, 10)), " ".join(base).upper(), "", "", "泽菲尔星表中的两颗行星", a[0]]
    got = exact_jaccard(a, b)
    for i, (x, y) in enumerate(zip(a, b)):
        sx, sy = (set(shingle_hashes([t], 5, 5)[0].tolist()) for t in (x, y))
        want = len(sx & sy) / len(sx | sy) if sx | sy else 1.0
        assert got[i] == pytest.approx(want), i
    assert got[1] == 1.0 and got[2] == 1.0 and got[3] == 0.0 and 0.5 < got[0] < 0.9


def test_minhash_cjk_uses_character_shingles():
    a = "泽菲尔星表中的一颗行星。这里的天空是红色的，它有三颗卫星，首都是一座古老的城市。"
    b = a.replace("红色", "蓝色")
    s = signatures([a, b], ngram=5, cjk_ngram=3)
    assert 0.4 < estimated_jaccard(s[0], s[1]) < 1.0


def test_band_keys_shape_and_band_separation():
    s = signatures(["a b c d e f g", "a b c d e f g"])
    k = band_keys(s, 16, 8)
    assert k.shape == (2, 16) and (k[0] == k[1]).all() and len(set(k[0].tolist())) == 16


# ----------------------------------------------------------------------------- dedup grouping
def test_exact_groups_prefer_eval_then_smallest_id():
    batch = pd.DataFrame({"text_hash": ["h1", "h1", "h1", "h2"], "priority": [1, 1, 0, 1], "id": ["a", "b", "c", "d"]})
    out = dedup._exact_groups(batch).sort_values("id")
    assert out["id"].tolist() == ["a", "b"]
    assert out["duplicate_of"].tolist() == ["c", "c"]
    assert out["reason"].tolist() == ["eval_contamination", "eval_contamination"]


def test_bucket_pairs_all_pairs_and_components_collapse_transitive():
    batch = pd.DataFrame(
        {
            "bucket": np.array([1, 1, 1, 2, 2, 3], dtype=np.uint64),
            "key": np.array([10, 11, 12, 12, 13, 14], dtype=np.uint64),
        }
    )
    pairs = dedup._bucket_pairs(batch)
    assert sorted(map(tuple, pairs.to_numpy().tolist())) == [(10, 11), (10, 12), (11, 12), (12, 13)]
    edges = pd.DataFrame(
        {
            "id_a": ["b", "c", "x"],
            "priority_a": [1, 1, 1],
            "id_b": ["c", "d", "y"],
            "priority_b": [1, 1, 0],
            "jaccard": [0.9, 0.9, 0.9],
        }
    )
    out = dedup.components(edges).sort_values("id").reset_index(drop=True)
    assert out.to_dict("records") == [
        {"id": "c", "duplicate_of": "b", "reason": "near_duplicate"},
        {"id": "d", "duplicate_of": "b", "reason": "near_duplicate"},
        {"id": "x", "duplicate_of": "y", "reason": "eval_contamination"},
    ]


def test_perplexity_scores_match_the_model_loss_and_ignore_padding(tiny_model_path):
    import math

    import torch

    from tailorlm.config import FilterConfig
    from tailorlm.data.perplexity import PerplexityFilter

    f = PerplexityFilter(FilterConfig(max_perplexity=50.0).model_dump(), tiny_model_path, batch_size=3)
    texts = ["a short line", "The harbor town sits at the mouth of a wide river and the boats come home.", "zz"]
    batched = f.scores(texts)
    for text, score in zip(texts, batched):
        ids = torch.tensor([f.tok(text, add_special_tokens=False)["input_ids"]])
        with torch.inference_mode():
            loss = f.model(input_ids=ids, labels=ids).loss.item()
        assert score == pytest.approx(math.exp(loss), rel=1e-4)  # padding in the batch changes nothing
    batch = pd.DataFrame({"text": texts, "reason": [None, None, "empty"]})
    out = f(batch)
    assert math.isnan(out.at[2, "perplexity"]) and out.at[2, "reason"] == "empty"  # dropped rows unscored
    for i in (0, 1):
        assert (out.at[i, "reason"] == "perplexity:too_high") == (batched[i] > 50.0)
