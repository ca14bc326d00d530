"""PII: find and redact e-mail addresses, phone numbers, IP addresses, card and ID numbers.

Numbers that carry a checksum are only redacted when it validates: credit cards (Luhn), Chinese
resident IDs (ISO 7064 MOD 11-2). US SSNs are checked against the ranges never issued. Written
by hand: the libraries that do this (presidio, scrubadub) pull spaCy models we cannot download.
"""

from __future__ import annotations

import ipaddress
import json
import re
from typing import Callable

import pandas as pd

EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9.-]{1,253}\.[A-Za-z]{2,24}\b")
CARD = re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])")
CN_ID = re.compile(r"(?<!\d)[1-9]\d{5}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx](?!\d)")
SSN = re.compile(r"(?<!\d)(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?!\d)")
IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?!\.?\d)")
IPV6 = re.compile(r"(?<![:\w])(?:[0-9A-Fa-f]{1,4}:){2,7}[0-9A-Fa-f]{0,4}(?![:\w])")
PHONE = re.compile(
    r"(?<![\w+])(?:"
    r"(?:\+?1[ .-]?)?\(?\d{3}\)?[ .-]\d{3}[ .-]\d{4}"  # North American
    r"|\+\d{1,3}[ .-]?\d{1,4}(?:[ .-]?\d{2,4}){2,4}"  # international with country code
    r"|(?:\+?86[ -]?)?1[3-9]\d[ -]?\d{4}[ -]?\d{4}"  # Chinese mobile
    r"|0\d{2,3}-\d{7,8}"  # Chinese landline
    r")(?!\w)"
)
TAGS = {
    "email": "[EMAIL]",
    "phone": "[PHONE]",
    "ip": "[IP]",
    "credit_card": "[CREDIT_CARD]",
    "id_number": "[ID_NUMBER]",
}


def luhn_ok(number: str) -> bool:
    digits = [int(c) for c in number if c.isdigit()]
    if not 13 <= len(digits) <= 19:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def cn_id_ok(number: str) -> bool:
    weights = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2]
    total = sum(int(c) * w for c, w in zip(number[:17], weights))
    return "10X98765432"[total % 11] == number[17].upper()


def _ip_ok(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


# kind -> [(pattern, validator)], applied in this order: checksummed numbers before phones so a
# card number is not half-redacted as a phone.
DETECTORS: dict[str, list[tuple[re.Pattern, Callable[[str], bool] | None]]] = {
    "email": [(EMAIL, None)],
    "credit_card": [(CARD, luhn_ok)],
    "id_number": [(CN_ID, cn_id_ok), (SSN, None)],
    "ip": [(IPV4, _ip_ok), (IPV6, _ip_ok)],
    "phone": [(PHONE, None)],
}


_DIGIT = re.compile(r"\d")
# A character each pattern cannot match without: most documents lack some of them, and a
# substring test is far cheaper than running the pattern (the IPv6 and phone ones are slow).
NEEDS = {EMAIL: "@", IPV4: ".", IPV6: ":"}
NEEDS_DIGIT = {CARD, CN_ID, SSN, IPV4, PHONE}  # not IPV6: "a:b:c:d:e:f:a:b" is an address


def redact(text: str, kinds: list[str]) -> tuple[str, dict[str, int]]:
    """Replace each validated match with its tag; return the text and counts by kind."""
    counts: dict[str, int] = {}
    digits = bool(_DIGIT.search(text))
    for kind, detectors in DETECTORS.items():
        if kind not in kinds:
            continue
        for pattern, valid in detectors:
            if (pattern in NEEDS and NEEDS[pattern] not in text) or (pattern in NEEDS_DIGIT and not digits):
                continue  # this pattern cannot match here

            def sub(m: re.Match, kind=kind, valid=valid) -> str:
                if valid is not None and not valid(m.group(0)):
                    return m.group(0)
                counts[kind] = counts.get(kind, 0) + 1
                return TAGS[kind]

            text = pattern.sub(sub, text)
    return text, counts


def pii_batch(batch: pd.DataFrame, kinds: list[str]) -> pd.DataFrame:
    """Redact PII in live rows (text and chat turns); `pii` holds the counts as JSON."""
    live = batch["reason"].isna()
    for i in batch.index[live]:
        text, counts = redact(batch.at[i, "text"], kinds)
        if counts:
            batch.at[i, "text"] = text
            msgs = batch.at[i, "messages"]
            if isinstance(msgs, str):
                turns = json.loads(msgs)
                for t in turns:
                    t["content"] = redact(t["content"], kinds)[0]
                batch.at[i, "messages"] = json.dumps(turns, ensure_ascii=False)
            batch.at[i, "pii"] = json.dumps(counts, sort_keys=True)
    return batch
