"""Corpus readers: every format, chunk boundaries, non-UTF-8 input, missing fields."""

from __future__ import annotations

import gzip
import json
import os
import random
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainer.data.readers import ReadStats, expand_inputs, iter_chunks, parse_chunk, read_documents
from trainer.errors import UserError


def _random_docs(seed: int, n: int = 60) -> list[str]:
    rng = random.Random(seed)
    alphabet = "abcdefghij ąčęėįšųūž ЖЯ 漢字 \t"
    docs = []
    for i in range(n):
        length = rng.choice([0, 1, 5, 50, 400, 3000]) if i % 7 else 0
        docs.append("".join(rng.choice(alphabet) for _ in range(length)))
    return docs


def _write_jsonl(path, docs, field="text", opener=open):
    with opener(path, "wt", encoding="utf-8") as fh:
        for i, d in enumerate(docs):
            fh.write(json.dumps({"id": i, field: d}, ensure_ascii=bool(i % 2)) + "\n")
            if i % 5 == 0:
                fh.write("\n")  # blank lines between records are allowed


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".jsonl.gz"])
def test_jsonl_roundtrip_any_chunk_size(tmp_path, seed, suffix):
    docs = _random_docs(seed)
    path = tmp_path / f"c{suffix}"
    _write_jsonl(path, docs, opener=gzip.open if suffix.endswith(".gz") else open)
    for chunk_bytes in (1, 97, 1 << 20):
        stats = ReadStats()
        assert list(read_documents(path, stats=stats, chunk_bytes=chunk_bytes)) == docs
        assert stats.documents == len(docs) and stats.replaced == 0


def test_parquet_streams_by_row_group(tmp_path, seed):
    docs = _random_docs(seed, n=3000)
    path = tmp_path / "culturax_like.parquet"
    table = pa.table({"text": docs, "url": [f"u{i}" for i in range(len(docs))]})
    pq.write_table(table, path, row_group_size=700)
    chunks = list(iter_chunks(path, chunk_bytes=10_000))
    assert len(chunks) >= 3  # streamed in record batches, not read whole
    assert [d for c in chunks for d in parse_chunk(c)[0]] == docs
    assert list(read_documents(path)) == docs


def test_parquet_binary_column_counts_replacements(tmp_path):
    path = tmp_path / "b.parquet"
    pq.write_table(pa.table({"content": pa.array([b"ok", b"bad \xff\xfe end"], type=pa.binary())}), path)
    stats = ReadStats()
    assert list(read_documents(path, text_field="content", stats=stats)) == ["ok", "bad \ufffd\ufffd end"]
    assert stats.replaced == 2


def test_plain_text_blank_line_separated(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("\n\nfirst doc line 1\nline 2\n\n\n  \t\nsecond\r\n\r\n   indented third\nend\n")
    docs = list(read_documents(path))
    assert docs == ["first doc line 1\nline 2", "second", "   indented third\nend"]
    gz = tmp_path / "t.txt.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert list(read_documents(gz, chunk_bytes=3)) == docs


def test_plain_text_chunking_never_splits_documents(tmp_path, seed):
    rng = random.Random(seed)
    docs = ["\n".join("w" * rng.randint(1, 30) for _ in range(rng.randint(1, 8))) for _ in range(300)]
    path = tmp_path / "t.txt"
    path.write_text("\n\n".join(docs) + "\n")
    for chunk_bytes in (1, 50, 4096):
        assert list(read_documents(path, chunk_bytes=chunk_bytes)) == docs


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xc3 x \xff\xfe"}\n{"text": "lone \\ud800 half"}\n')
    stats = ReadStats()
    docs = list(read_documents(path, stats=stats))
    assert docs == ["ok", "caf\ufffd x \ufffd\ufffd", "lone \ufffd half"]
    assert stats.replaced == 4  # 3 invalid bytes, 1 lone surrogate escape
    txt = tmp_path / "bad.txt"
    txt.write_bytes(b"good\n\nbad \x80\x81 bytes\n")
    stats = ReadStats()
    assert list(read_documents(txt, stats=stats)) == ["good", "bad \ufffd\ufffd bytes"]
    assert stats.replaced == 2


def test_surrogate_escapes_lone_or_paired_either_case(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_bytes(b'{"text": "pair \\ud83d\\ude00"}\n{"text": "low \\uDC00 high \\uDBFF"}\n'
                     b'{"text": "hangul \\ud55c, a backslash \\\\ud800"}\n')
    stats = ReadStats()
    assert list(read_documents(path, stats=stats)) == ["pair \U0001F600", "low \ufffd high \ufffd",
                                                       "hangul \ud55c, a backslash \\ud800"]
    assert stats.replaced == 2


@pytest.mark.parametrize("chunk_bytes", [1, 40, 1 << 20])
def test_jsonl_with_crlf_whitespace_lines_and_no_final_newline(tmp_path, chunk_bytes):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'\r\n  \n{"text": "a"}\r\n{"text": "b c"}\n \t \n\n{"text": ""}\r\n{"text": "last"}')
    stats = ReadStats()
    assert list(read_documents(path, stats=stats, chunk_bytes=chunk_bytes)) == ["a", "b c", "", "last"]
    assert stats.replaced == 0


def test_plain_files_are_cut_into_byte_ranges_the_worker_reads(tmp_path, seed):
    """The reading process carries no text for a plain file: chunks are byte ranges covering it exactly."""
    docs = _random_docs(seed, n=200)
    path = tmp_path / "c.jsonl"
    _write_jsonl(path, docs)
    chunks = list(iter_chunks(path, chunk_bytes=500))
    assert len(chunks) > 5 and all(c.payload is None for c in chunks)
    assert [c.offset for c in chunks] == [0] + [c.offset + c.length for c in chunks[:-1]]
    assert sum(c.length for c in chunks) == path.stat().st_size
    assert all(c.data().endswith(b"\n") for c in chunks)
    assert [d for c in chunks for d in parse_chunk(c)[0]] == docs


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this platform")
def test_named_pipe_is_streamed(tmp_path, seed):
    docs = _random_docs(seed, n=80)
    source = tmp_path / "source.jsonl"
    _write_jsonl(source, docs)
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(source.read_bytes()))
    writer.start()
    try:
        chunks = list(iter_chunks(fifo, chunk_bytes=300))
    finally:
        writer.join(timeout=10)
    assert len(chunks) > 3 and all(c.payload is not None for c in chunks)
    assert [d for c in chunks for d in parse_chunk(c)[0]] == docs


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
@pytest.mark.parametrize("chunk_bytes", [1, 64, 1 << 20])
def test_error_line_numbers_hold_in_later_chunks(tmp_path, suffix, chunk_bytes):
    lines = [json.dumps({"text": f"document {i}"}) for i in range(60)]
    lines[5] = ""  # blank lines count as lines
    lines[41] = '{"content": "no text"}'
    path = tmp_path / f"c{suffix}"
    data = ("\r\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)
    with pytest.raises(UserError, match=rf"c\{suffix}:42: no field 'text'"):
        list(read_documents(path, chunk_bytes=chunk_bytes))


def test_missing_text_field_names_field_file_and_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "a"}\n{"content": "b"}\n')
    with pytest.raises(UserError, match=r"c\.jsonl:2: no field 'text' \(fields: content\).*--text-field"):
        list(read_documents(path))
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(UserError, match=r"p\.parquet: no column 'text' \(columns: content\)"):
        list(read_documents(tmp_path / "p.parquet"))


@pytest.mark.parametrize("content, message", [
    ('{"text": "a"}\n{"text": null}\n', r":2: field 'text' is null"),
    ('{"text": "a"}\n{"text": 3}\n', r":2: field 'text' is int"),
    ('{"text": "a"}\n{"text": "b"\n', r":2: not valid JSON"),
    ('{"text": "a"}\n["text"]\n', r":2: expected a JSON object"),
    ('[{"text": "a"}]\n', r"JSON array, not JSON Lines"),
    (" \n" * 200 + '[{"text": "a"}]\n', r"JSON array, not JSON Lines"),
])
def test_malformed_jsonl_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "c.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        list(read_documents(path))


def test_parquet_null_text_is_an_error(tmp_path):
    path = tmp_path / "n.parquet"
    pq.write_table(pa.table({"text": ["a", None]}), path)
    with pytest.raises(UserError, match=r"row 2: column 'text' is null"):
        list(read_documents(path))


def test_inputs_expand_directories_and_reject_unknown_formats(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("d/b.jsonl", "d/sub/a.txt", "d/notes.md"):
        (tmp_path / name).write_text("x\n")
    assert expand_inputs([tmp_path / "d"]) == [tmp_path / "d/b.jsonl", tmp_path / "d/sub/a.txt"]
    with pytest.raises(UserError, match="unknown corpus format"):
        expand_inputs([tmp_path / "d/notes.md"])
    with pytest.raises(FileNotFoundError):
        expand_inputs([tmp_path / "missing.jsonl"])
