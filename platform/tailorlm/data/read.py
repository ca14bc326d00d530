"""Sources -> one Ray Dataset in the normalized schema, one row per input record.

Every input record becomes exactly one row: readable ones with `reason` None, unreadable ones
(malformed JSON, invalid UTF-8, missing text) with `reason` set, so they land in `dropped/`.
Input that cannot be read as a whole (a missing path, an unsupported format) raises at once.

Files are parsed in our own function rather than with `read_json`: Ray's JSON reader fails the
whole file on one bad line and does not give line positions, and we need both (a row-level
reason, and an id from file and position). A large uncompressed JSONL or text file is read as byte
ranges of RANGE_BYTES, one Ray task each, so one big file is parsed on every CPU and no task holds
more than a range; a first pass counts the lines that start in each range, so positions are the
file's own line numbers either way. Lines end at "\n" (an "\r" before it is dropped), as JSON
Lines defines them.
"""

from __future__ import annotations

import gzip
import io
import json
import re
from typing import Any, Iterator

import fsspec
from fsspec.core import url_to_fs

from tailorlm.config import SourceConfig

# row: `<path>#<position>` of the record, unique per input line even where the input repeats ids
COLUMNS = ["id", "source", "row", "kind", "text", "raw_text", "messages", "reason", "duplicate_of", "pii"]
SUFFIX_FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".text": "text",
    ".md": "text",
}


class SourceError(ValueError):
    """A data source that cannot be read at all."""


def source_error(exc: BaseException) -> SourceError | None:
    """The SourceError a Ray task raised, out of the wrappers Ray Data puts around it
    (UserCodeException caused by a RayTaskError whose `cause` is ours), so the user gets the one
    line that says what is wrong with the file, not a remote traceback."""
    first, seen = exc, set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        cause = getattr(exc, "cause", None)
        if isinstance(cause, SourceError):
            return cause
        if type(exc) is SourceError:
            return exc
        exc = exc.__cause__ or exc.__context__ or cause
    # Ray Data's UserCodeException does not always keep the remote exception as a cause (a map
    # fused into an actor pool loses it); the remote traceback in the message still names it
    found = re.search(r"\bSourceError: (.+)", str(first))
    return SourceError(found.group(1).strip()) if found else None


def file_format(path: str, declared: str = "auto") -> str:
    if declared != "auto":
        return declared
    name = path.lower().removesuffix(".gz")
    for suffix, fmt in SUFFIX_FORMATS.items():
        if name.endswith(suffix):
            return fmt
    raise SourceError(
        f"data.sources: unsupported file type {path!r}; supported: "
        f"{', '.join(sorted(SUFFIX_FORMATS))} (optionally .gz), or set format explicitly"
    )


def expand_source(src: SourceConfig) -> list[str]:
    """A file, folder, glob or URI -> the list of files it names (sorted, so ids are stable)."""
    fs, path = url_to_fs(src.path)
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    unstrip = (lambda p: p) if proto in ("file", "local") else (lambda p: f"{proto}://{p}")
    if any(ch in path for ch in "*?["):
        files = [p for p in fs.glob(path) if fs.isfile(p)]
        if not files:
            raise SourceError(f"data.sources: glob {src.path!r} matches no files")
    elif not fs.exists(path):
        raise SourceError(f"data.sources: path {src.path!r} does not exist")
    elif fs.isdir(path):
        files = [p for p in fs.find(path) if not p.rsplit("/", 1)[-1].startswith((".", "_"))]
        if src.format == "auto":
            files = [p for p in files if p.lower().removesuffix(".gz").endswith(tuple(SUFFIX_FORMATS))]
        if not files:
            raise SourceError(f"data.sources: folder {src.path!r} holds no readable files")
    else:
        files = [path]
    for f in files:
        file_format(f, src.format)  # fail now on an unsupported file, before any work
    return sorted(unstrip(f) for f in files)


# ----------------------------------------------------------------------------- records
def _messages_from(rec: dict[str, Any]) -> list[dict[str, str]] | None:
    """Chat records: `messages` [{role, content}] or ShareGPT `conversations` [{from, value}]."""
    turns = rec.get("messages", rec.get("conversations"))
    if not isinstance(turns, list):
        return None
    role_map = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}
    out = []
    for t in turns:
        if not isinstance(t, dict):
            return None
        role = t.get("role", t.get("from"))
        content = t.get("content", t.get("value"))
        if not isinstance(role, str) or not isinstance(content, str):
            return None
        out.append({"role": role_map.get(role, role), "content": content})
    return out or None


def record_to_row(rec: Any, kind: str, default_id: str, source: str) -> dict[str, Any]:
    """One parsed record -> a normalized row; unusable records get a reason instead of text."""
    row = dict.fromkeys(COLUMNS)
    row.update(source=source, id=default_id, row=default_id, kind=kind)
    if not isinstance(rec, dict):
        row["reason"] = "malformed_record"
        return row
    if rec.get("id") is not None:
        row["id"] = str(rec["id"])
    if kind == "auto":
        kind = "chat" if "messages" in rec or "conversations" in rec else "alpaca" if "instruction" in rec else "text"
    row["kind"] = kind
    if kind == "chat":
        msgs = _messages_from(rec)
        if msgs is None:
            row["reason"] = "missing_text"
            return row
    elif kind == "alpaca":
        instr, inp, out = rec.get("instruction"), rec.get("input") or "", rec.get("output")
        if not isinstance(instr, str) or not isinstance(out, str) or not isinstance(inp, str):
            row["reason"] = "missing_text"
            return row
        msgs = [
            {"role": "user", "content": f"{instr}\n\n{inp}" if inp.strip() else instr},
            {"role": "assistant", "content": out},
        ]
    else:
        text = rec.get("text", rec.get("content"))
        if not isinstance(text, str):
            row["reason"] = "missing_text"
            return row
        row["text"] = row["raw_text"] = text
        return row
    row["messages"] = json.dumps(msgs, ensure_ascii=False)
    row["text"] = row["raw_text"] = "\n".join(m["content"] for m in msgs)
    return row


def parse_file(data: bytes, path: str, fmt: str, kind: str) -> Iterator[dict[str, Any]]:
    """Bytes of one file -> rows. Ids default to `<path>#<position>`."""
    if path.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise SourceError(f"{path}: not valid gzip ({exc})") from None
    if fmt == "parquet":
        import pyarrow.parquet as pq

        for i, rec in enumerate(pq.read_table(io.BytesIO(data)).to_pylist()):
            yield record_to_row(rec, kind, f"{path}#{i}", path)
        return
    if fmt == "json":
        try:
            recs = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SourceError(f"{path}: not a valid JSON document ({exc}); use .jsonl for one record per line")
        for i, rec in enumerate(recs if isinstance(recs, list) else [recs]):
            yield record_to_row(rec, kind, f"{path}#{i}", path)
        return
    yield from parse_lines(data, path, fmt, kind, first_line=0)


def split_lines(data: bytes) -> list[bytes]:
    """JSON Lines' lines: split at "\n", a trailing "\r" dropped, no empty piece after a final "\n"."""
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return [ln[:-1] if ln.endswith(b"\r") else ln for ln in lines]


def parse_lines(data: bytes, path: str, fmt: str, kind: str, first_line: int) -> Iterator[dict[str, Any]]:
    """Rows of JSONL or text lines; data starts at the start of line number first_line."""
    for i, raw in enumerate(split_lines(data), start=first_line):
        if not raw.strip():
            continue
        default_id = f"{path}#{i}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            yield {
                **dict.fromkeys(COLUMNS),
                "id": default_id,
                "row": default_id,
                "source": path,
                "kind": kind,
                "reason": "invalid_utf8",
                "raw_text": raw.decode("utf-8", errors="replace"),
            }
            continue
        if fmt == "text":  # one document per line
            yield record_to_row({"text": line}, "text", default_id, path)
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            yield {
                **dict.fromkeys(COLUMNS),
                "id": default_id,
                "row": default_id,
                "source": path,
                "kind": kind,
                "reason": "malformed_json",
                "raw_text": line,
            }
            continue
        yield record_to_row(rec, kind, default_id, path)


GZIP_RATIO = 4
RANGE_BYTES = 32 * 2**20  # ~25k web documents; large enough that per-task overhead is small


def _plan(files: list[str], declared: str, kind: str, range_bytes: int = RANGE_BYTES) -> list[dict[str, Any]]:
    """One read per file, or per byte range of a large uncompressed JSONL/text file, each with the
    estimated `bytes` it will parse."""
    out = []
    for path in files:
        fmt = file_format(path, declared)
        fs, p = url_to_fs(path)
        size = fs.size(p)
        if size > range_bytes and fmt in ("jsonl", "text") and not path.endswith(".gz"):
            cuts = list(range(0, size, range_bytes)) + [size]
            out += [dict(path=path, fmt=fmt, kind=kind, start=a, end=b, bytes=b - a) for a, b in zip(cuts, cuts[1:])]
        else:
            # end -1: the whole file; bytes: what will be parsed (text compresses about 4x in gzip)
            est = size * (GZIP_RATIO if path.endswith(".gz") else 1)
            out.append(dict(path=path, fmt=fmt, kind=kind, start=0, end=-1, bytes=est))
    return out


def _line_starts(path: str, start: int, end: int) -> int:
    """How many lines start at a byte offset in [start, end): one after each "\n" in
    [start-1, end-1), and one at 0."""
    with fsspec.open(path, "rb") as fh:
        fh.seek(max(0, start - 1))
        data = fh.read(end - max(0, start - 1) - 1)
    return data.count(b"\n") + (start == 0 and end > 0)


def _read_range(path: str, start: int, end: int) -> bytes:
    """The bytes of the lines that start in [start, end) (the last one read to its end)."""
    with fsspec.open(path, "rb") as fh:
        if start > 0:
            fh.seek(start - 1)
            fh.readline()  # the rest of the line that started before this range
        here = fh.tell()
        data = fh.read(max(0, end - here))
        if data and not data.endswith(b"\n"):
            data += fh.readline()
    return data


def parse_task(batch: dict[str, Any]) -> Any:
    """One planned read -> a frame of rows (one block per read)."""
    import pandas as pd

    rows: list[dict[str, Any]] = []
    for path, fmt, kind, start, end, first in zip(
        batch["path"], batch["fmt"], batch["kind"], batch["start"], batch["end"], batch["first_line"]
    ):
        if end < 0:
            try:
                with fsspec.open(path, "rb") as fh:
                    data = fh.read()
            except FileNotFoundError:
                raise SourceError(f"data.sources: {path!r} disappeared while it was being read") from None
            rows += parse_file(data, path, fmt, kind)
        else:
            rows += parse_lines(_read_range(path, int(start), int(end)), path, fmt, kind, int(first))
    return pd.DataFrame(rows, columns=COLUMNS)


def plan_reads(sources: list[SourceConfig]) -> list[dict[str, Any]]:
    """All sources -> the planned reads (a file each, or a byte range of a large one), with each
    read's estimated `bytes` of input. Line positions are filled in by `number_lines`."""
    plan, seen = [], set()
    for src in sources:
        files = expand_source(src)
        # a file read twice would give two rows the same position (`row`), which dedup relies on
        # being unique; naming a file twice is a mistake, so say so rather than double it
        twice = seen.intersection(files)
        if twice:
            raise SourceError(f"data.sources: {sorted(twice)[0]!r} is named by more than one source")
        seen.update(files)
        plan += _plan(files, src.format, src.kind)
    return plan


def number_lines(plan: list[dict[str, Any]], remote: bool) -> list[dict[str, Any]]:
    """Set `first_line` of each read: the file's own line number where a byte range starts (a
    pass counting the lines that start in each range: Ray tasks when remote)."""
    ranged = [r for r in plan if r["end"] >= 0]
    if remote:
        import ray

        count = ray.remote(num_cpus=1)(_line_starts)
        counts = ray.get([count.remote(r["path"], r["start"], r["end"]) for r in ranged])
    else:
        counts = [_line_starts(r["path"], r["start"], r["end"]) for r in ranged]
    first: dict[str, int] = {}
    for r, n in zip(ranged, counts):  # planned in file order, ranges in offset order
        r["first_line"] = first.get(r["path"], 0)
        first[r["path"]] = r["first_line"] + n
    for r in plan:
        r.setdefault("first_line", 0)
    return plan


def read_sources(plan: list[dict[str, Any]]):
    """The planned reads -> one Ray Dataset of normalized rows, one block per read (lazy, except
    the line count of ranged files)."""
    import ray

    plan = number_lines(plan, remote=True)
    return ray.data.from_items(plan, override_num_blocks=len(plan)).map_batches(
        parse_task, batch_size=1, batch_format="numpy"
    )


def read_in_process(plan: list[dict[str, Any]]) -> list[Any]:
    """The planned reads parsed here, one frame per read: the same rows as read_sources."""
    return [parse_task({k: [v] for k, v in r.items()}) for r in number_lines(plan, remote=False)]


def write_demo(uri: str) -> str:
    """Materialize the generated demo data set at uri (any fsspec location); returns the folder."""
    import tempfile

    from tailorlm.demo_data import write_demo_sources

    fs, path = url_to_fs(uri)
    with tempfile.TemporaryDirectory() as tmp:
        write_demo_sources(tmp)
        fs.makedirs(path, exist_ok=True)
        for name in ("docs.jsonl", "instructions.jsonl", "chat.jsonl"):
            with open(f"{tmp}/{name}", "rb") as src, fsspec.open(f"{uri.rstrip('/')}/{name}", "wb") as dst:
                dst.write(src.read())
    return uri
