"""Streaming corpus readers: JSON Lines (plain or gzip), Parquet (by row group) and plain text.

    stats = ReadStats()
    for text in read_documents("culturax_lt_part_00000.parquet", text_field="text", stats=stats):
        ...
    stats.replaced   # invalid UTF-8 bytes (and lone surrogate escapes in JSON) replaced by U+FFFD

Format by file name: `.jsonl`, `.json` (JSON Lines too), `.parquet`, `.txt`; `.gz` on JSON Lines or text means gzip.
Plain text holds documents separated by blank lines (a line that is empty or whitespace only); a document is its
lines joined by "\\n".

Reading is split in two so the tokenizer can parallelise it: `iter_chunks` (cheap, in the reading process) cuts a
file into `Chunk`s of about `chunk_bytes` of whole documents without parsing them, and `parse_chunk` (in a worker)
turns a chunk into strings. `read_documents` is the two composed. Memory stays bounded by the chunk size, never
by the file size.
"""

from __future__ import annotations

import codecs
import dataclasses
import gzip
import io
import json
import os
import re
import stat
import threading
from pathlib import Path
from typing import Iterator

from trainer.errors import UserError

DEFAULT_CHUNK_BYTES = 1 << 20
SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".txt", ".txt.gz")


@dataclasses.dataclass
class ReadStats:
    """What a reader saw: documents yielded and characters replaced because the input was not valid UTF-8."""

    documents: int = 0
    replaced: int = 0


@dataclasses.dataclass
class Chunk:
    """Whole documents of one file, still unparsed: picklable, so a worker process can parse it.

    kind "jsonl" / "text": complete lines, either carried in `payload` (gzip input, which cannot be sought) or, for
    plain files, only named by their byte range (`offset`, `length`) and read by the worker, so the reading process
    neither reads nor ships the text; kind "parquet": `payload` is a pyarrow Array of the text column.
    `first_line` (1-based) places errors in the file: the line of JSON Lines, the row of Parquet; for a byte range
    it is counted only when an error needs it.
    """

    kind: str
    path: str
    payload: object
    text_field: str = "text"
    first_line: int | None = 1
    offset: int = 0
    length: int = 0

    def data(self) -> bytes:
        """The chunk's bytes (JSON Lines and text)."""
        if self.payload is not None:
            return self.payload  # type: ignore[return-value]
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read(self.length)
        if len(data) != self.length:
            raise UserError(f"{self.path}: the file shrank while it was being read (expected {self.length} bytes at "
                            f"offset {self.offset}, got {len(data)}); read a file nothing else is writing")
        return data

    def line(self, index: int) -> int:
        """The file's line (row) number of the chunk's `index`-th line (row), counting from 0."""
        if self.first_line is None:
            newlines = 0
            with open(self.path, "rb") as fh:
                remaining = self.offset
                while remaining:
                    block = fh.read(min(remaining, 1 << 20))
                    if not block:
                        break
                    newlines += block.count(b"\n")
                    remaining -= len(block)
            self.first_line = newlines + 1
        return self.first_line + index


def file_format(path: str | os.PathLike) -> str:
    """"jsonl", "parquet" or "text" from the file name; a UserError for anything else."""
    name = Path(path).name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".txt", ".txt.gz")):
        return "text"
    raise UserError(f"{path}: unknown corpus format; use one of {', '.join(SUFFIXES)} "
                    "(JSON Lines, Parquet, or plain text with documents separated by blank lines)")


def expand_inputs(inputs: list[str | os.PathLike]) -> list[Path]:
    """Files as given, and the corpus files inside given directories (recursively, sorted by path)."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.name.lower().endswith(SUFFIXES))
            if not found:
                raise UserError(f"{p}: directory holds no corpus files ({', '.join(SUFFIXES)})")
            files.extend(found)
        elif p.is_file():
            file_format(p)
            files.append(p)
        else:
            raise FileNotFoundError(2, "no such file or directory", str(p))
    return files


# --- decoding that counts what it replaces ----------------------------------------------------------------------

_replaced = threading.local()


def _count_and_replace(exc: UnicodeDecodeError) -> tuple[str, int]:
    _replaced.n = getattr(_replaced, "n", 0) + (exc.end - exc.start)
    return "\ufffd", exc.end


codecs.register_error("gemma_ewc.count_replace", _count_and_replace)


def decode_utf8(data: bytes) -> tuple[str, int]:
    """`data` as text, each invalid byte sequence replaced by U+FFFD (as errors="replace"), and the bytes replaced."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        _replaced.n = 0
        text = data.decode("utf-8", "gemma_ewc.count_replace")
        return text, _replaced.n


def _replace_lone_surrogates(text: str) -> tuple[str, int]:
    # JSON may escape half of a surrogate pair ("\ud800"): valid JSON, but not encodable as UTF-8.
    fixed = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return fixed, sum(1 for a, b in zip(text, fixed) if a != b)


# --- chunking (reading process) ---------------------------------------------------------------------------------

def _check_not_json_array(path: Path, kind: str, head: bytes) -> None:
    if kind == "jsonl" and head.lstrip()[:1] == b"[":
        raise UserError(f"{path}: this is a JSON array, not JSON Lines; write one JSON object per line "
                        "(for example: jq -c '.[]' in.json > out.jsonl)")


def _complete_chunk(fh: io.BufferedIOBase, kind: str, block: bytes) -> list[bytes]:
    """What to read after `block` so the chunk ends at the end of a line (a document, for plain text)."""
    tail = []
    if block and not block.endswith(b"\n"):
        tail.append(fh.readline())
    if kind == "text":
        while True:
            line = fh.readline()
            tail.append(line)
            if not line or not line.strip():
                break
    return tail


def _line_chunks(path: Path, kind: str, text_field: str, chunk_bytes: int) -> Iterator[Chunk]:
    if path.name.lower().endswith(".gz"):
        yield from _streamed_line_chunks(path, kind, text_field, chunk_bytes, opener=gzip.open)
        return
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):  # a named pipe or a device: no seeking, so the chunks carry their bytes
        yield from _streamed_line_chunks(path, kind, text_field, chunk_bytes, opener=open)
        return
    # A regular file is cut into byte ranges: seek ahead, read to the end of that line, and leave the rest to the
    # worker. The reading process touches one line per chunk, so on few cores it takes no time from the workers.
    size = info.st_size
    with open(path, "rb") as fh:
        _check_not_json_array(path, kind, fh.read(min(max(chunk_bytes, 1 << 16), size)))
        start = 0
        while start < size:
            fh.seek(min(start + max(chunk_bytes, 1), size) - 1)
            last = fh.read(1)
            _complete_chunk(fh, kind, last)
            end = fh.tell()
            yield Chunk(kind, str(path), None, text_field, first_line=1 if start == 0 else None, offset=start,
                        length=end - start)
            start = end


def _streamed_line_chunks(path: Path, kind: str, text_field: str, chunk_bytes: int, *,
                          opener) -> Iterator[Chunk]:
    with opener(path, "rb") as fh:
        line_no = 1
        first = True
        while True:
            block = fh.read(chunk_bytes)
            if not block:
                return
            if first:
                _check_not_json_array(path, kind, block)
            first = False
            tail = _complete_chunk(fh, kind, block)  # type: ignore[arg-type]
            payload = b"".join([block, *tail]) if tail else block
            yield Chunk(kind, str(path), payload, text_field, line_no)
            line_no += payload.count(b"\n")


def _parquet_chunks(path: Path, text_field: str, chunk_bytes: int) -> Iterator[Chunk]:
    # pyarrow takes ~0.2 s to import: paid only by Parquet inputs, not by every tokenize worker.
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserError(f"{path}: not a readable Parquet file ({exc})") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise UserError(f"{path}: no column {text_field!r} (columns: {', '.join(names)}); "
                        "choose the text column with --text-field")
    column_type = pf.schema_arrow.field(text_field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)
            or pa.types.is_binary(column_type) or pa.types.is_large_binary(column_type)):
        raise UserError(f"{path}: column {text_field!r} has type {column_type}, not text")
    pending: list = []
    size = 0
    first_row = 1
    # iter_batches reads one row group at a time; small batches are regrouped to about chunk_bytes.
    for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
        array = batch.column(0)
        pending.append(array)
        size += array.nbytes
        if size >= chunk_bytes:
            chunk = Chunk("parquet", str(path), pa.concat_arrays(pending), text_field, first_row)
            first_row += len(chunk.payload)
            yield chunk
            pending, size = [], 0
    if pending:
        yield Chunk("parquet", str(path), pa.concat_arrays(pending), text_field, first_row)


def iter_chunks(path: str | os.PathLike, *, text_field: str = "text",
                chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[Chunk]:
    """Cut one corpus file into chunks of whole documents, about `chunk_bytes` each, without parsing them."""
    path = Path(path)
    kind = file_format(path)
    if kind == "parquet":
        yield from _parquet_chunks(path, text_field, chunk_bytes)
    else:
        yield from _line_chunks(path, kind, text_field, chunk_bytes)


# --- parsing (worker) -------------------------------------------------------------------------------------------

# A blank line: a newline, optional whitespace, a newline (greedy, so runs of blank lines are one separator).
_BLANK_LINES = re.compile(r"\n\s*\n")


# A JSON escape of a UTF-16 surrogate (\ud800 to \udfff): json.loads turns an unpaired one into a str that cannot
# be encoded as UTF-8. Searched for only where the bytes hold a backslash at all (one memchr).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _may_hold_lone_surrogates(data: bytes) -> bool:
    return b"\\" in data and _SURROGATE_ESCAPE.search(data) is not None


def _texts_of_records(array_text: str, expected: int, field: str) -> list[str] | None:
    """The `field` of each record of a JSON array holding `expected` objects; None where anything is off."""
    try:
        records = json.loads(array_text)
        if len(records) != expected:
            return None
        texts = [r[field] for r in records]
    except (json.JSONDecodeError, KeyError, TypeError, IndexError):
        return None
    return texts if all(type(t) is str for t in texts) else None


def _parse_jsonl(chunk: Chunk) -> tuple[list[str], int]:
    # Fast path: the chunk as one JSON array (one C-level parse instead of one json.loads per line): its newlines
    # become commas, or, where blank lines make that invalid, its non-blank lines are joined. Anything odd (bad
    # JSON, a missing field, a non-string) falls back to the line-by-line parse, which names file and line.
    # Newlines are replaced in the bytes, before decoding (fewer copies; byte 0x0A is never inside a UTF-8
    # sequence, so the replacements counted are the same).
    data = chunk.data()
    field = chunk.text_field
    start, end = 0, len(data)
    while end > start and data[end - 1] in b" \t\r\n":  # a view, not a copy, of the stripped bytes
        end -= 1
    while start < end and data[start] in b" \t\r\n":
        start += 1
    array = b"[" + memoryview(data)[start:end] + b"]"
    text, replaced = decode_utf8(array.replace(b"\n", b","))
    texts = _texts_of_records(text, array.count(b"\n") + 1 if end > start else 0, field)
    if texts is None:
        text, replaced = decode_utf8(data)
        lines = [line for line in text.split("\n") if line.strip()]
        texts = _texts_of_records("[" + ",".join(lines) + "]", len(lines), field)
    if texts is None:
        return _parse_jsonl_lines(chunk, data)
    if _may_hold_lone_surrogates(data):
        for i, t in enumerate(texts):
            try:
                t.encode("utf-8")
            except UnicodeEncodeError:
                texts[i], bad = _replace_lone_surrogates(t)
                replaced += bad
    return texts, replaced


def _parse_jsonl_lines(chunk: Chunk, data: bytes) -> tuple[list[str], int]:
    texts: list[str] = []
    replaced = 0
    field = chunk.text_field
    for i, raw in enumerate(data.split(b"\n")):
        if not raw.strip():
            continue
        line, bad = decode_utf8(raw)
        replaced += bad
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{chunk.path}:{chunk.line(i)}: not valid JSON ({exc.msg}, column {exc.colno})") \
                from None
        if not isinstance(record, dict):
            raise UserError(f"{chunk.path}:{chunk.line(i)}: expected a JSON object per line, "
                            f"found {type(record).__name__}")
        try:
            text = record[field]
        except KeyError:
            fields = ", ".join(map(str, list(record)[:20])) or "none"
            raise UserError(f"{chunk.path}:{chunk.line(i)}: no field {field!r} (fields: {fields}); "
                            "choose the text field with --text-field") from None
        if not isinstance(text, str):
            raise UserError(f"{chunk.path}:{chunk.line(i)}: field {field!r} is "
                            f"{'null' if text is None else type(text).__name__}, not a string")
        if _may_hold_lone_surrogates(raw):
            text, bad = _replace_lone_surrogates(text)
            replaced += bad
        texts.append(text)
    return texts, replaced


def _parse_text(chunk: Chunk) -> tuple[list[str], int]:
    text, replaced = decode_utf8(chunk.data())
    texts = [d.strip("\r\n") for d in _BLANK_LINES.split(text)]
    return [d for d in texts if d.strip()], replaced


def _parse_parquet(chunk: Chunk) -> tuple[list[str], int]:
    import pyarrow as pa

    array = chunk.payload
    if array.null_count:  # type: ignore[union-attr]
        row = array.is_null().to_pylist().index(True)  # type: ignore[union-attr]
        raise UserError(f"{chunk.path}: row {chunk.line(row)}: column {chunk.text_field!r} is null; "
                        "drop or fill such rows first")
    if pa.types.is_binary(array.type) or pa.types.is_large_binary(array.type):  # type: ignore[union-attr]
        texts, replaced = [], 0
        for raw in array.to_pylist():  # type: ignore[union-attr]
            text, bad = decode_utf8(raw)
            texts.append(text)
            replaced += bad
        return texts, replaced
    return array.to_pylist(), 0  # type: ignore[union-attr]


def parse_chunk(chunk: Chunk) -> tuple[list[str], int]:
    """The documents of a chunk, and how many characters were replaced to make them valid text."""
    if chunk.kind == "jsonl":
        return _parse_jsonl(chunk)
    if chunk.kind == "text":
        return _parse_text(chunk)
    if chunk.kind == "parquet":
        return _parse_parquet(chunk)
    raise AssertionError(chunk.kind)


def read_documents(path: str | os.PathLike, *, text_field: str = "text", stats: ReadStats | None = None,
                   chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[str]:
    """Stream the documents of one corpus file, in file order (format from the file name, see the module doc).

    Invalid UTF-8 is replaced by U+FFFD and counted in `stats.replaced`; a record without `text_field` is a
    UserError naming the field, the file and the line.
    """
    for chunk in iter_chunks(path, text_field=text_field, chunk_bytes=chunk_bytes):
        texts, replaced = parse_chunk(chunk)
        if stats is not None:
            stats.documents += len(texts)
            stats.replaced += replaced
        yield from texts
