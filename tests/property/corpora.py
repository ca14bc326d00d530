"""Hypothesis strategies for data-stage corpora, and the files they are written to.

A corpus is a list of `Line`s spread over one to three files (.jsonl or .jsonl.gz). Each line is
what a user's file might hold: a text, alpaca or chat record built from a pool of distinct
documents, an exact copy of an earlier line, a near copy at some word-substitution rate, a row
that a read or filter step must drop for a known reason, CJK and mixed-script text, a very long
row, PII, or a line that is not JSON at all. Ids are unique, missing, repeated or integers.

Documents are word salad from a fixed English vocabulary with enough stop words for the quality
filter, generated from a drawn seed, so hypothesis shrinks seeds, not megabytes of text.
"""

from __future__ import annotations

import gzip
import json
import random
from dataclasses import dataclass
from pathlib import Path

from hypothesis import strategies as st

WORDS = (
    "harbor river market bridge church valley railway coast winter snow station orchard blossom "
    "library scholar sailor century morning evening garden mountain forest village island bakery "
    "teacher student window painter music lantern meadow castle tower field farmer baker miller "
    "weaver potter carpenter smith road wagon horse sheep cattle barley wheat apple pear plum"
).split()
STOP = "the of and to with that have be".split()
HAN = "天地人山水火木金土日月星云风雨雪花草鸟鱼城市河海春夏秋冬东南西北学生老师书画音乐路车马牛羊"
CYRILLIC = "гавань река рынок мост церковь долина".split()

# a line's fate when it is fixed by what it is, whatever else the corpus holds
FIXED_REASON = {
    "malformed": "malformed_json",
    "bad_utf8": "invalid_utf8",
    "no_text": "missing_text",
    "blank_text": "empty",
    "short": "too_short_chars",
    "too_long": "too_long_chars",
}


def document(seed: int, words: int = 70) -> str:
    rng = random.Random(seed)
    out = []
    for i in range(words):
        out.append(rng.choice(STOP) if i % 4 == 1 else rng.choice(WORDS))
        if i % 12 == 11:
            out[-1] += "."
    return "The " + " ".join(out) + "."


def near_copy(text: str, rate: float, seed: int) -> str:
    """Substitute about `rate` of the words (at least one) with vocabulary words."""
    rng = random.Random(seed)
    words = text.split()
    for i in rng.sample(range(len(words)), max(1, round(len(words) * rate))):
        words[i] = rng.choice(WORDS) + "s"
    return " ".join(words)


def cjk(seed: int, mixed: bool) -> str:
    rng = random.Random(seed)
    han = "".join(rng.choice(HAN) for _ in range(90)) + "。"
    if not mixed:
        return han
    return document(seed, 40) + " " + han[:40] + " " + " ".join(rng.choice(CYRILLIC) for _ in range(5))


@dataclass
class Line:
    kind: str  # text | alpaca | chat | cjk | mixed | pii | long | copy | near | FIXED_REASON key
    id: object = None  # None: no id key; else the JSON value written
    text: str | None = None  # the document the record carries (None for fixed-fate lines)
    file: int = 0

    def record(self) -> bytes:
        """The bytes of this line in its file."""
        if self.kind == "malformed":
            return b'{"text": "unterminated'
        if self.kind == "bad_utf8":
            return b'{"text": "caf\xe9 \xff"}'
        rec: dict = {} if self.id is None else {"id": self.id}
        if self.kind == "alpaca":
            head, _, tail = self.text.partition(". ")
            rec.update(instruction=head + ".", input="", output=tail)
        elif self.kind == "chat":
            head, _, tail = self.text.partition(". ")
            rec["messages"] = [{"role": "user", "content": head + "."}, {"role": "assistant", "content": tail}]
        elif self.kind != "no_text":
            rec["text"] = self.text
        return json.dumps(rec, ensure_ascii=False).encode()


# too_long is not drawn: a drawn "long" row past max_chars becomes one
ROW_KINDS = [
    "text",
    "text",
    "alpaca",
    "chat",
    "cjk",
    "mixed",
    "pii",
    "copy",
    "copy",
    "near",
    "near",
    *(k for k in FIXED_REASON if k != "too_long"),
    "long",
]


@st.composite
def corpora(draw, max_rows: int = 100) -> list[Line]:
    n = draw(st.integers(0, max_rows))
    lines: list[Line] = []
    for i in range(n):
        kind = draw(st.sampled_from(ROW_KINDS))
        seed = draw(st.integers(0, 10_000))
        earlier = [ln for ln in lines if ln.text is not None and ln.kind not in FIXED_REASON]
        if kind in ("copy", "near") and not earlier:
            kind = "text"
        if kind == "copy":
            src = draw(st.sampled_from(earlier))
            line = Line(src.kind, src.id if draw(st.booleans()) else f"c{i}", src.text)  # maybe the same id
        elif kind == "near":
            src = draw(st.sampled_from(earlier))
            rate = draw(st.sampled_from([0.02, 0.05, 0.15, 0.4]))
            line = Line("text", f"n{i}", near_copy(src.text, rate, seed))
        else:
            text = {
                "text": lambda: document(seed),
                "alpaca": lambda: document(seed),
                "chat": lambda: document(seed),
                "cjk": lambda: cjk(seed, mixed=False),
                "mixed": lambda: cjk(seed, mixed=True),
                "pii": lambda: (
                    document(seed % 7) + f" Write to user{seed}@mail.example or call 415-555-{seed % 10000:04d}."
                ),
                "long": lambda: " ".join(document(seed + k) for k in range(draw(st.sampled_from([3, 60, 300])))),
                "short": lambda: "tiny row",
                "blank_text": lambda: " \t ",
                "no_text": lambda: None,
                "malformed": lambda: None,
                "bad_utf8": lambda: None,
            }[kind]()
            if kind == "long" and len(text) > 100_000:
                kind = "too_long"  # past data.filters.max_chars: decided before its id, which must be unique
            line = Line(kind, None, text)
            if kind not in ("malformed", "bad_utf8"):
                # fixed-fate lines keep unique ids, so the test can look their reason up by id
                line.id = draw(
                    st.sampled_from(
                        ["unique", "missing", "int", "repeat"] if kind not in FIXED_REASON else ["unique", "missing"]
                    )
                )
                ids = [ln.id for ln in lines if ln.id is not None and ln.kind not in FIXED_REASON]
                line.id = {
                    "unique": f"r{i}",
                    "missing": None,
                    "int": 100_000 + i,
                    "repeat": draw(st.sampled_from(ids)) if ids else f"r{i}",
                }[line.id]
        lines.append(line)
    n_files = draw(st.integers(1, 3))
    for line in lines:
        line.file = draw(st.integers(0, n_files - 1))
    return lines


def write_corpus(lines: list[Line], folder: Path, gz: list[bool], blank_every: int = 0) -> list[tuple[str, str, Line]]:
    """Write the lines to files in folder; returns (path, id, line) for every line, with the id
    the stage must give it (the record's id as a string, or `<path>#<line index>`)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = max((ln.file for ln in lines), default=0) + 1
    expected: list[tuple[str, str, Line]] = []
    for f in range(files):
        path = str(folder / (f"part{f}.jsonl" + (".gz" if gz[f % len(gz)] else "")))
        body = []
        for ln in (ln for ln in lines if ln.file == f):
            if blank_every and len(body) % blank_every == blank_every - 1:
                body.append(b"   ")  # blank lines are skipped but still count in line positions
            pos = len(body)
            body.append(ln.record())
            expected.append(
                (
                    path,
                    str(ln.id) if ln.id is not None and ln.kind not in ("malformed", "bad_utf8") else f"{path}#{pos}",
                    ln,
                )
            )
        data = b"\n".join(body) + (b"\n" if body else b"")
        Path(path).write_bytes(gzip.compress(data) if path.endswith(".gz") else data)
    return expected
