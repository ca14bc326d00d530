"""A large file read as byte ranges gives the same rows, with the same line positions, as the
file read whole: every line exactly once, wherever the range boundaries fall."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from tailorlm.data import read

line = st.one_of(
    st.builds(lambda t: json.dumps({"text": t}, ensure_ascii=False), st.text(max_size=30)),
    st.builds(lambda i, t: json.dumps({"id": i, "text": t}), st.integers(0, 5), st.text(max_size=5)),
    st.just(""),  # blank: skipped, still counted in positions
    st.just("   "),
    st.just("{not json"),
    st.just("x" * 200),  # longer than a range
)


def ranged_rows(path: str, range_bytes: int) -> list[dict]:
    plan = read._plan([path], "auto", "auto", range_bytes)
    rows, first = [], 0
    for r in plan:
        if r["end"] < 0:  # small enough to be read whole
            with open(path, "rb") as fh:
                return list(read.parse_file(fh.read(), path, r["fmt"], r["kind"]))
        rows += read.parse_lines(read._read_range(path, r["start"], r["end"]), path, r["fmt"], r["kind"], first)
        first += read._line_starts(path, r["start"], r["end"])
    return rows


@settings(max_examples=150, deadline=None)
@given(
    lines=st.lists(line, max_size=25),
    newline=st.sampled_from(["\n", "\r\n"]),
    final_newline=st.booleans(),
    range_bytes=st.integers(1, 64),
)
def test_ranges_equal_whole_file(tmp_path_factory, lines, newline, final_newline, range_bytes):
    path = str(tmp_path_factory.mktemp("r") / "f.jsonl")
    data = newline.join(lines) + (newline if final_newline and lines else "")
    with open(path, "wb") as fh:
        fh.write(data.encode())
    whole = list(read.parse_file(data.encode(), path, "jsonl", "auto"))
    assert ranged_rows(path, range_bytes) == whole
    positions = [r["row"] for r in whole]
    assert len(positions) == len(set(positions))
    # a position is the line's number in the file
    numbered = [f"{path}#{i}" for i, ln in enumerate(lines) if ln.strip()]
    assert positions == numbered
