"""Benchmark task files: their records (CSV, JSON, JSON Lines, Parquet) and multiple-choice (MMLU) items.

One reader serves `gemma-ewc eval` (every task type, trainer.evaluate.tasks) and `gemma-ewc fisher --format mmlu`
(MMLU prompts, trainer.prompts). The two differ only in what they do with an item that cannot be used: eval
skips it and reports the reason (ItemError), the Fisher stops with a UserError naming the file and line.

    for item_id, row in read_records(Path("mmlu/test/anatomy_test.csv")):   # ("anatomy_test.csv:1", {...})
        item = mmlu_item(row, subject="anatomy")                          # MCItem, or ItemError
    items = read_mmlu("mmlu/")                                            # every file below, UserError if bad

MMLU layouts: CSV with the header question,choice0,choice1,choice2,choice3,answer (answer an index); Hendrycks'
header-less CSV question,A,B,C,D,answer-letter; Hugging Face question, subject, choices[], answer (Parquet, JSON,
JSON Lines). The subject comes from the record, else from the file name (anatomy_test.csv -> anatomy).
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from trainer.errors import UserError

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MMLU_FIELDS = ("question, choice0..choice3, answer (CSV; MMLU's header-less CSV too) or question, choices[], "
               "answer[, subject] (Hugging Face)")


class ItemError(ValueError):
    """An item that cannot be used (a missing field, an answer out of range); the message is the reason."""


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice item: `answer` is the index of the right choice."""

    question: str
    choices: tuple[str, ...]
    answer: int
    subject: str = ""


# ------------------------------------------------------------------------------------------------------ files

def benchmark_files(path: str | os.PathLike, *, recursive: bool = False) -> list[Path]:
    """The task files of a file or directory: the directory's own files (recursive: every file below it; not
    recursive: a directory with none of its own reads its test/ folder), sorted."""
    path = Path(path)
    if path.is_dir():
        found = path.rglob("*") if recursive else path.iterdir()
        files = sorted(p for p in found if p.suffix.lower() in DATA_SUFFIXES and p.is_file())
        if not files and not recursive and (path / "test").is_dir():
            files = sorted(p for p in (path / "test").iterdir() if p.suffix.lower() in DATA_SUFFIXES)
        if not files:
            raise UserError(f"{path} holds no task files ({', '.join(DATA_SUFFIXES)})")
        return files
    if not path.exists():
        raise UserError(f"task file {path} not found")
    return [path]


def subject_from_filename(path: Path) -> str:
    """MMLU's subject from a file name: anatomy_test.csv -> anatomy (a _test/_dev/_val/_validation/_train suffix)."""
    return re.sub(r"_(test|dev|val|validation|train)$", "", path.stem)


def _json_lines(path: Path, lines) -> list[tuple[str, dict]]:
    rows = []
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{line_no} is not valid JSON ({exc.msg}); a .jsonl task file holds "
                            f"one JSON object per line") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{line_no} is a JSON {type(row).__name__}, not an object")
        rows.append((f"{path.name}:{line_no}", row))
    return rows


def _json(path: Path) -> list[tuple[str, dict]]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and text.lstrip().startswith("{"):
            return _json_lines(path, text.splitlines())  # JSON Lines named .json (datasets' to_json writes these)
        raise UserError(f"{path} is not valid JSON ({exc})") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list) and all(isinstance(r, dict) for r in v)]
        data = lists[0] if len(lists) == 1 else [data]  # an object holding the list of items, or one item
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise UserError(f"{path}: expected a JSON list of objects")
    return [(f"{path.name}[{i}]", r) for i, r in enumerate(data)]


def _csv(path: Path) -> list[tuple[str, dict]]:
    with open(path, encoding="utf-8", newline="") as fh:
        table = [(line_no, r) for line_no, r in enumerate(csv.reader(fh), 1) if r]
    if not table:
        return []
    header = [h.strip() for h in table[0][1]]
    if "question" in header:
        return [(f"{path.name}:{line_no}", dict(zip(header, r))) for line_no, r in table[1:]]
    # The original MMLU CSVs have no header: question, choices..., answer letter.
    if len(header) < 4:
        raise UserError(f"{path}: a CSV task file needs a header with 'question' or MMLU's header-less "
                        f"columns question,A,B,C,D,answer; the first row has {len(header)} column(s)")
    return [(f"{path.name}:{line_no}", {"question": r[0], **{f"choice{k}": c for k, c in enumerate(r[1:-1])},
                                        "answer": r[-1]}) for line_no, r in table]


def read_records(path: Path) -> list[tuple[str, dict]]:
    """(item id "file:line" or "file[index]", record) for every record of a task file."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            with open(path, encoding="utf-8") as fh:
                return _json_lines(path, fh)
        if suffix == ".json":
            return _json(path)
        if suffix == ".csv":
            return _csv(path)
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return [(f"{path.name}[{i}]", r) for i, r in enumerate(pq.read_table(path).to_pylist())]
    except UserError:
        raise
    except UnicodeDecodeError as exc:
        raise UserError(f"cannot read {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except PermissionError:
        raise UserError(f"cannot read {path}: permission denied") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory") from None
    except OSError as exc:
        if isinstance(exc, FileNotFoundError):
            raise UserError(f"task file {path} not found") from None
        raise UserError(f"cannot read {path}: {exc}") from None
    except Exception as exc:  # pyarrow's errors for a damaged file
        raise UserError(f"cannot read {path} as {suffix[1:]}: {exc}") from None
    raise UserError(f"{path}: unknown task file type {suffix or '(none)'}; use one of {', '.join(DATA_SUFFIXES)}")


# ----------------------------------------------------------------------------------------------------- fields

def require(row: dict, key: str):
    if key not in row or row[key] is None:
        raise ItemError(f"missing field '{key}'")
    return row[key]


def require_text(row: dict, key: str) -> str:
    value = require(row, key)
    if not isinstance(value, str):
        raise ItemError(f"field '{key}' is a {type(value).__name__}, expected text")
    return value


def answer_index(value, n: int, what: str) -> int:
    """An answer given as an int, a digit string or a letter -> a checked 0-based index into n choices."""
    if isinstance(value, bool):
        raise ItemError(f"{what} is a boolean")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    shown = value
    if isinstance(value, str):
        v = value.strip()
        if v.lstrip("-").isdigit():
            value = shown = int(v)
        elif len(v) == 1 and v.upper() in LETTERS:
            value = LETTERS.index(v.upper())
        else:
            raise ItemError(f"{what} {value!r} is neither an index nor a letter")
    if not isinstance(value, int):
        raise ItemError(f"{what} {value!r} is not an index")
    if not 0 <= value < n:
        raise ItemError(f"{what} {shown!r} is out of range for {n} choices")
    return value


def text_choices(value, what: str) -> list[str]:
    if not isinstance(value, (list, tuple)) or len(value) < 2:
        raise ItemError(f"{what} must be a list of at least two answers")
    if not all(isinstance(c, str) for c in value):
        raise ItemError(f"{what} must hold text answers")
    return list(value)


# ------------------------------------------------------------------------------------------------------- MMLU

def is_mmlu_record(row: dict) -> bool:
    return "question" in row and "answer" in row and (
        "choice0" in row or isinstance(row.get("choices"), (list, tuple)))


def mmlu_item(row: dict, *, subject: str | None = None) -> MCItem:
    """An MMLU record (either layout) -> MCItem, or ItemError with the reason. `subject`: when the record has none."""
    if "choices" in row:
        choices = text_choices(row["choices"], "choices")
    else:
        choices = [row[f"choice{k}"] for k in range(len(LETTERS)) if f"choice{k}" in row]
        if len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise ItemError("needs at least choice0 and choice1 as text")
    question = require_text(row, "question")
    answer = answer_index(require(row, "answer"), len(choices), "answer")
    return MCItem(question, tuple(choices), answer, str(row.get("subject") or subject or ""))


def mmlu_files(path: str | os.PathLike) -> list[Path]:
    """The MMLU files of a file or of a directory (every task file below it)."""
    return benchmark_files(path, recursive=True)


def read_mmlu(path: str | os.PathLike) -> list[MCItem]:
    """Every item of an MMLU file or directory; an item that cannot be used is a UserError naming it."""
    items: list[MCItem] = []
    for file in mmlu_files(path):
        subject = subject_from_filename(file)
        for item_id, row in read_records(file):
            try:
                items.append(mmlu_item(row, subject=subject))
            except ItemError as exc:
                raise UserError(f"{file.with_name(item_id)}: {exc}; the MMLU layout is {MMLU_FIELDS}") from None
    if not items:
        raise UserError(f"{path}: no MMLU items found")
    return items
