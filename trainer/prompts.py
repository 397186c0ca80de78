"""Multiple-choice prompts (MMLU): reading the items, formatting the prompt, tokenizing it so that exactly the
answer letter is scored.

    items = read_mmlu("mmlu/test")                       # CSV dir/file, or HF Parquet / JSON(L)
    p = format_mmlu_prompt(item.question, item.choices, item.subject)          # -> MMLUPrompt
    ids, target = answer_letter_tokens(sp, p.prompt, p.answer(item.answer))   # score only `target`

A template is plain text with the fields {subject}, {examples}, {question}, {options} and {answer}. Everything
before {answer} is the prompt; the answer letter replaces {answer}, so the template decides what separates them
("Answer:\\n{answer}" or "Answer: {answer}"). The default mirrors the reference study's Fisher prompt: an
instruction naming the subject, one worked example, the question, options "A. ..." to "D. ...", then "Answer:"
and a newline. Two deliberate differences from its text: a newline after the instruction (the reference ran it
into "Example:") and a single space before the subject (its subject formatter added a second one).
"""

from __future__ import annotations

import csv
import json
import os
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from trainer.errors import UserError

LETTERS = "ABCDEFGHIJ"

DEFAULT_MMLU_TEMPLATE = (
    "The following is a multiple choice question (with answers) about {subject}. "
    "Respond only with the letter corresponding to the right answer.\n"
    "Example:\n"
    "How much is 2+2?\n"
    "A. 0\n"
    "B. 2\n"
    "C. 4\n"
    "D. 9\n"
    "Answer:\n"
    "C\n"
    "{examples}"
    "{question}\n"
    "{options}\n"
    "Answer:\n"
    "{answer}"
)
TEMPLATE_FIELDS = {"subject", "examples", "question", "options", "answer"}


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice item: `answer` is the index of the right choice."""

    question: str
    choices: tuple[str, ...]
    answer: int
    subject: str = ""


@dataclass(frozen=True)
class MMLUPrompt:
    prompt: str  # the text the model reads
    answer_format: str  # text after the prompt, with "{letter}" where the answer letter goes

    def answer(self, index: int) -> str:
        return self.answer_format.replace("{letter}", LETTERS[index])


def format_subject(subject: str) -> str:
    return subject.replace("_", " ").strip()


def format_options(choices: Sequence[str]) -> str:
    """'A. first\\nB. second\\n...' (no trailing newline)."""
    if not 2 <= len(choices) <= len(LETTERS):
        raise ValueError(f"a multiple-choice item needs 2 to {len(LETTERS)} choices, got {len(choices)}")
    return "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))


def check_template(template: str, *, source: str = "template") -> None:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise UserError(f"{source}: not a valid template ({exc}); write literal braces as {{{{ and }}}}") from None
    unknown = sorted(set(fields) - TEMPLATE_FIELDS)
    if unknown:
        raise UserError(f"{source}: unknown field(s) {unknown}; a template may use {sorted(TEMPLATE_FIELDS)}")
    for required in ("question", "options", "answer"):
        if fields.count(required) != 1:
            raise UserError(f"{source}: the field {{{required}}} must appear exactly once")
    if not template.rstrip().endswith("{answer}"):
        raise UserError(f"{source}: {{answer}} must be the last thing in the template (the scored letter)")


def load_template(path: str | os.PathLike) -> str:
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if text.endswith("\n") and not text.endswith("{answer}"):
        text = text.rstrip("\n")  # an editor's final newline after {answer}
    check_template(text, source=str(path))
    return text


def format_example(item: MCItem) -> str:
    """A solved example in the default layout: question, options, 'Answer:', the letter, each on its own line."""
    return f"{item.question}\n{format_options(item.choices)}\nAnswer:\n{LETTERS[item.answer]}\n"


def format_mmlu_prompt(question: str, choices: Sequence[str], subject: str = "", *,
                       examples: Iterable[MCItem] = (), template: str = DEFAULT_MMLU_TEMPLATE) -> MMLUPrompt:
    """The prompt for one item; the answer letter goes where the template says (see the module doc)."""
    examples = list(examples)
    if examples and "{examples}" not in template:
        raise ValueError("examples were given but the template has no {examples} field")
    text = template.format(subject=format_subject(subject), examples="".join(map(format_example, examples)),
                           question=question.strip(), options=format_options(choices), answer="\x00")
    prompt, after = text.split("\x00")
    return MMLUPrompt(prompt=prompt, answer_format="{letter}" + after)


def answer_letter_tokens(sp, prompt: str, answer_text: str, *, bos_id: int | None) -> tuple[list[int], int]:
    """(input ids, target id): the model reads `input ids` and its last position is scored against `target`.

    The target is the first token where the tokenization of prompt + answer departs from that of the prompt
    alone: the answer letter's token, or its first piece when the letter splits into several. A prompt that
    ends in a space ("Answer: ") loses that space to the letter's token ("▁A"), exactly as the model would
    have seen the text.
    """
    full = sp.encode(prompt + answer_text)
    alone = sp.encode(prompt)
    n = 0
    limit = min(len(full), len(alone))
    while n < limit and full[n] == alone[n]:
        n += 1
    if n == len(full):
        raise ValueError(f"the answer {answer_text!r} adds no token after the prompt")
    ids = ([bos_id] if bos_id is not None else []) + full[:n]
    if not ids:
        raise ValueError("the prompt tokenizes to nothing before the answer")
    return ids, full[n]


# ------------------------------------------------------------------------------------------------- reading MMLU

MMLU_CSV_HEADER = ["question", "choice0", "choice1", "choice2", "choice3", "answer"]
_MMLU_SUFFIXES = (".csv", ".parquet", ".json", ".jsonl")


def mmlu_files(path: str | os.PathLike) -> list[Path]:
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _MMLU_SUFFIXES)
        if not files:
            raise UserError(f"{path}: no MMLU files (*.csv, *.parquet, *.json, *.jsonl) in this directory")
        return files
    if not path.exists():
        raise UserError(f"{path}: no such file or directory")
    if path.suffix not in _MMLU_SUFFIXES:
        raise UserError(f"{path}: unknown MMLU file type {path.suffix!r}; give .csv, .parquet, .json or .jsonl")
    return [path]


def _answer_index(value, n_choices: int, where: str) -> int:
    if isinstance(value, str):
        v = value.strip()
        if len(v) == 1 and v.upper() in LETTERS[:n_choices]:
            return LETTERS.index(v.upper())
        try:
            value = int(v)
        except ValueError:
            raise UserError(f"{where}: answer {value!r} is neither a letter nor an index") from None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n_choices:
        raise UserError(f"{where}: answer {value!r} is not an index 0..{n_choices - 1}")
    return value


def _subject_from_filename(path: Path) -> str:
    stem = path.stem
    for suffix in ("_test", "_dev", "_val", "_validation", "_train", "_auxiliary_train"):
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def _read_csv(path: Path) -> list[MCItem]:
    """Hendrycks' layout (no header, answer letter) or ours (header MMLU_CSV_HEADER, answer index)."""
    subject = _subject_from_filename(path)
    items = []
    with open(path, newline="", encoding="utf-8") as fh:
        for line, row in enumerate(csv.reader(fh), start=1):
            if line == 1 and [c.strip().lower() for c in row] == MMLU_CSV_HEADER:
                continue
            if len(row) < 3:
                raise UserError(f"{path}:{line}: expected question, choices..., answer; got {len(row)} column(s)")
            choices = tuple(row[1:-1])
            items.append(MCItem(row[0], choices, _answer_index(row[-1], len(choices), f"{path}:{line}"), subject))
    return items


def _item_from_record(rec: dict, where: str, default_subject: str) -> MCItem:
    missing = [k for k in ("question", "choices", "answer") if k not in rec]
    if missing:
        raise UserError(f"{where}: record lacks {missing}; the MMLU layout is question, subject, choices, answer")
    choices = tuple(str(c) for c in rec["choices"])
    return MCItem(str(rec["question"]), choices, _answer_index(rec["answer"], len(choices), where),
                  str(rec.get("subject") or default_subject))


def _read_records(path: Path) -> list[MCItem]:
    subject = _subject_from_filename(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            records = pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise UserError(f"{path}: not a readable Parquet file ({exc})") from None
        return [_item_from_record(r, f"{path} row {i}", subject) for i, r in enumerate(records)]
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: not valid JSON ({exc})") from None
        return [_item_from_record(r, f"{path} item {i}", subject) for i, r in enumerate(records)]
    items = []
    for line, raw in enumerate(text.splitlines(), start=1):
        if raw.strip():
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{line}: not valid JSON ({exc})") from None
            items.append(_item_from_record(rec, f"{path}:{line}", subject))
    return items


def read_mmlu(path: str | os.PathLike) -> list[MCItem]:
    """Every item of an MMLU file or directory (CSV per subject, or Hugging Face Parquet / JSON / JSON lines)."""
    items: list[MCItem] = []
    for file in mmlu_files(path):
        items += _read_csv(file) if file.suffix == ".csv" else _read_records(file)
    if not items:
        raise UserError(f"{path}: no MMLU items found")
    return items
