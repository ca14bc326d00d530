"""The drift measures on generated inputs: KL is a divergence (zero on itself, never negative or
infinite), histograms and shares are distributions, and all of it is deterministic."""

import math
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from tailorlm.monitor.drift import kl_divergence, length_histogram, prompt_of, shares, unigrams

texts = st.lists(st.text(max_size=60), max_size=20)
counts = st.dictionaries(st.text(min_size=1, max_size=5), st.integers(0, 50), max_size=15).map(Counter)


@settings(max_examples=60, deadline=None)
@given(p=counts, q=counts, alpha=st.floats(0.01, 2))
def test_kl_is_a_divergence(p, q, alpha):
    assert kl_divergence(p, p, alpha) < 1e-12
    kl = kl_divergence(p, q, alpha)
    assert 0 <= kl < math.inf and kl == kl_divergence(Counter(dict(reversed(list(p.items())))), q, alpha)


@settings(max_examples=60, deadline=None)
@given(t=texts)
def test_histograms_and_shares_are_distributions(t):
    h = length_histogram(t)
    assert len(h) == 9 and (abs(sum(h.values()) - 1) < 1e-9 if t else sum(h.values()) == 0)
    s = shares(x[:1] for x in t)
    assert not t or abs(sum(s.values()) - 1) < 1e-9
    assert unigrams(t) == unigrams(list(t))


def test_more_drift_is_more_kl():
    train = unigrams(["what is the capital of daleglen"] * 50 + ["how many moons has brookwood"] * 50)
    same = unigrams(["what is the capital of brookwood"] * 20)
    other = unigrams(["recommend a pasta recipe for dinner"] * 20)
    assert kl_divergence(same, train) < kl_divergence(other, train)


def test_prompt_of_text_and_chat_rows():
    import json

    turns = [("system", "be brief"), ("user", "hi"), ("assistant", "x")]
    chat = json.dumps([{"role": r, "content": c} for r, c in turns])
    assert prompt_of({"messages": chat, "text": "ignored"}) == "hi"
    assert prompt_of({"messages": None, "text": "plain"}) == "plain"
