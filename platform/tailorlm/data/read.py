"""Sources -> one Ray Dataset in the normalized schema, one row per input record.

Every input record becomes exactly one row: readable ones with `reason` None, unreadable ones
(malformed JSON, invalid UTF-8, missing text) with `reason` set, so they land in `dropped/`.
Input that cannot be read as a whole (a missing path, an unsupported format) raises at once.

Files are read with `ray.data.read_binary_files` and parsed in our own function rather than
with `read_json`: Ray's JSON reader fails the whole file on one bad line and does not give line
positions, and we need both (a row-level reason, and an id from file and position).
"""

from __future__ import annotations

import gzip
import io
import json
from typing import Any, Iterator

import fsspec
from fsspec.core import url_to_fs

from tailorlm.config import SourceConfig

# row: `<path>#<position>` of the record, unique per input line even where the input repeats ids
COLUMNS = ["id", "source", "row", "kind", "text", "raw_text", "messages", "reason", "duplicate_of", "pii"]
GZIP_MAGIC = b"\x1f\x8b"
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
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        cause = getattr(exc, "cause", None)
        if isinstance(cause, SourceError):
            return cause
        if type(exc) is SourceError:
            return exc
        if isinstance(cause, OSError) and "inflate" in str(cause):
            # Ray's reader gunzips .gz files itself and does not name the file that failed
            return SourceError(f"data.sources: a .gz input file is not valid gzip ({str(cause).splitlines()[0]})")
        exc = exc.__cause__ or exc.__context__
    return None


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
    # Ray's binary reader already gunzips .gz files by their name (it cannot be told not to:
    # compression None means "infer"); gunzipping again failed every .gz input. So only bytes
    # that still start with the gzip magic are ours to decompress.
    if path.endswith(".gz") and data[:2] == GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise SourceError(f"{path}: not a valid gzip file ({exc})") from None
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
    for i, raw in enumerate(data.splitlines()):
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


def read_sources(sources: list[SourceConfig]):
    """All sources -> one Ray Dataset of normalized rows (lazy)."""
    import ray

    datasets, seen = [], set()
    for src in sources:
        files = expand_source(src)
        # a file read twice would give two rows the same position (`row`), which dedup relies on
        # being unique; naming a file twice is a mistake, so say so rather than double it
        twice = seen.intersection(files)
        if twice:
            raise SourceError(f"data.sources: {sorted(twice)[0]!r} is named by more than one source")
        seen.update(files)

        def parse(row: dict[str, Any], kind: str = src.kind, declared: str = src.format) -> list[dict[str, Any]]:
            return list(parse_file(row["bytes"], row["path"], file_format(row["path"], declared), kind))

        datasets.append(ray.data.read_binary_files(files, include_paths=True).flat_map(parse))
    ds = datasets[0]
    return ds.union(*datasets[1:]) if len(datasets) > 1 else ds


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
