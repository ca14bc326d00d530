"""redact skips a pattern when the text lacks a character it needs; skipping must never change
what is found (reference: every pattern run on every text)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tailorlm.data import pii

ALL = ["email", "phone", "ip", "credit_card", "id_number"]
pieces = st.sampled_from(
    ["a@b.co", "x.y@mail.example.org", "+1 415-555-0100", "(212) 555 0199", "010-12345678", "13912345678",
     "192.168.0.1", "999.1.1.1", "fe80:0:0:0:0:0:0:1", "a:b:c:d:e:f:a:b", "dead:beef", "4111 1111 1111 1111",
     "11010519491231002X", "123-45-6789", "::", ".", ":", "@", "-", " ", "\n", "abc", "7", "2024"]
)  # fmt: skip
texts = st.lists(st.one_of(pieces, st.text(alphabet="0123456789abcdef:.@-+() ", max_size=12)), max_size=12).map("".join)


def unguarded(text):
    needs, needs_digit = pii.NEEDS, pii.NEEDS_DIGIT
    pii.NEEDS, pii.NEEDS_DIGIT = {}, set()
    try:
        return pii.redact(text, ALL)
    finally:
        pii.NEEDS, pii.NEEDS_DIGIT = needs, needs_digit


@settings(max_examples=400, deadline=None)
@given(texts)
def test_guards_change_nothing(text):
    assert pii.redact(text, ALL) == unguarded(text)


def test_hex_only_ipv6_is_found():
    assert pii.redact("at a:b:c:d:e:f:a:b today", ALL)[1] == {"ip": 1}
