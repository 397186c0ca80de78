"""Benchmark task files: reading, task-type detection, lm-eval-harness prompts, metrics.

Seven task types, each with the prompts and metrics of lm-evaluation-harness's default task of that name, so the
numbers are comparable with published ones:

- mmlu: question, choice0..3, answer (CSV with header; MMLU's original header-less CSV too), or question,
  choices[], answer, subject (Hugging Face). Metric acc.
- arc: question, choices{text, label}, answerKey (Hugging Face; AI2's nested question{stem, choices} too), or
  prompt, choices[], answer_idx. Metrics acc, acc_norm.
- hellaswag: ctx (or activity_label, ctx_a, ctx_b), endings[4], label. Metrics acc, acc_norm (primary).
- winogrande: sentence (one "_"), option1, option2, answer ("1"/"2"). Metric acc, by partial scoring.
- truthfulqa: question, mc1_targets, mc2_targets (each {choices, labels} or {answer: 0/1}). Metrics mc1, mc2.
- belebele: flores_passage, question, mc_answer1..4, correct_answer_num. Metrics acc, acc_norm.
- gsm8k: question, answer (ending "#### N"). Metrics exact_match_strict, exact_match_flexible (greedy generation).

acc: the choice of highest log-likelihood is the gold one. acc_norm: the same after dividing each log-likelihood
by the length of the choice's text in characters (lm-eval's acc_norm; lm-eval calls the byte version acc_bytes).
An item that cannot be scored (a missing field, an answer index out of range, a continuation that does not fit the
context) is skipped and reported with its reason, never scored as wrong or right.

Files: .jsonl, .json (a list of objects), .csv, .parquet; or a directory of them (MMLU's one file per subject,
e.g. mmlu/test/, each file a subtask), read by trainer.task_files (the reader the Fisher's MMLU uses too).
Few-shot examples (`num_fewshot`) come from a given file or from the matching dev/train file next to the test file
(mmlu/test/x_test.csv -> mmlu/dev/x_dev.csv), first n in file order (lm-eval's first_n sampler), and for MMLU from
the same subject.

The MMLU prompt here is lm-eval's (`mmlu_prompt`); the Fisher's MMLU prompt is the reference study's
(trainer.prompts).
"""

from __future__ import annotations

import abc
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from trainer.errors import UserError
from trainer.prompts import format_options, format_subject
from trainer.task_files import (LETTERS, MMLU_FIELDS, ItemError, answer_index, benchmark_files, is_mmlu_record,
                                mmlu_item, read_records, require, require_text, subject_from_filename,
                                text_choices)


# ------------------------------------------------------------------------------------------------------ task types

@dataclass
class Doc:
    """One normalized item: `query` (the prompt without the answer), `choices`, `gold`, and type-specific extras."""

    id: str
    query: str = ""
    choices: list[str] = field(default_factory=list)
    gold: int = 0
    subject: str | None = None
    extra: dict = field(default_factory=dict)


class TaskType(abc.ABC):
    name = ""
    fields = ""                 # what the error message lists
    metrics: tuple[str, ...] = ("acc",)
    primary = "acc"
    generation = False
    default_fewshot = 0
    target_delimiter = " "
    fewshot_delimiter = "\n\n"

    @abc.abstractmethod
    def matches(self, row: dict) -> bool:
        """Whether a record has this type's fields (used to detect the type from a file's first record)."""

    @abc.abstractmethod
    def parse(self, item_id: str, row: dict, *, subject: str | None) -> Doc:
        """A record -> Doc, or ItemError with the reason it cannot be scored."""

    def description(self, doc: Doc) -> str:
        return ""

    def fewshot_example(self, doc: Doc) -> str:
        return doc.query + self.target_delimiter + doc.choices[doc.gold]

    def requests(self, doc: Doc, prefix: str) -> list[tuple[str, str]]:
        return [(prefix + doc.query, self.target_delimiter + c) for c in doc.choices]

    def score(self, doc: Doc, logprobs: Sequence[float]) -> dict[str, float]:
        scores = {"acc": float(_argmax(logprobs) == doc.gold)}
        if "acc_norm" in self.metrics:
            norm = [lp / max(len(c), 1) for lp, c in zip(logprobs, doc.choices)]
            scores["acc_norm"] = float(_argmax(norm) == doc.gold)
        return scores


def _argmax(values: Sequence[float]) -> int:
    # The first maximum, as numpy.argmax (lm-eval's choice on ties).
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def mmlu_prompt(question: str, choices: Sequence[str]) -> str:
    """lm-eval's MMLU item: the question, lettered choices, "Answer:" (the answer is scored as " A", " B", ...)."""
    return f"{question.strip()}\n{format_options(choices)}\nAnswer:"


def mmlu_description(subject: str | None) -> str:
    about = f" about {format_subject(subject)}" if subject else ""
    return f"The following are multiple choice questions (with answers){about}.\n\n"


class MMLU(TaskType):
    name = "mmlu"
    fields = MMLU_FIELDS

    def matches(self, row):
        return is_mmlu_record(row)

    def parse(self, item_id, row, *, subject):
        item = mmlu_item(row, subject=subject)
        return Doc(item_id, mmlu_prompt(item.question, item.choices), list(LETTERS[:len(item.choices)]),
                   item.answer, item.subject or None)

    def description(self, doc):
        return mmlu_description(doc.subject)


class ARC(TaskType):
    name = "arc"
    fields = "question, choices{text, label}, answerKey (original) or prompt, choices[], answer_idx"
    metrics = ("acc", "acc_norm")

    def matches(self, row):
        return ("answerKey" in row and "question" in row) or ("prompt" in row and "answer_idx" in row)

    def parse(self, item_id, row, *, subject):
        if "answer_idx" in row:
            question = require_text(row, "prompt")
            choices = text_choices(require(row, "choices"), "choices")
            gold = answer_index(row["answer_idx"], len(choices), "answer_idx")
        else:
            question, choices_field = require(row, "question"), row.get("choices")
            if isinstance(question, dict):  # AI2's own jsonl: question{stem, choices[{text, label}]}
                choices_field = {"text": [c.get("text") for c in question.get("choices", [])],
                                 "label": [c.get("label") for c in question.get("choices", [])]}
                question = question.get("stem")
            if not isinstance(question, str):
                raise ItemError("field 'question' must be text (or AI2's {stem, choices})")
            if not isinstance(choices_field, dict) or "text" not in choices_field or "label" not in choices_field:
                raise ItemError("field 'choices' must be {text: [...], label: [...]}")
            choices = text_choices(choices_field["text"], "choices.text")
            labels = [str(x) for x in choices_field["label"]]
            key = str(require(row, "answerKey")).strip()
            if key not in labels:
                raise ItemError(f"answerKey {key!r} is not one of the labels {labels}")
            gold = labels.index(key)
        return Doc(item_id, f"Question: {question}\nAnswer:", choices, gold)


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag cleaning (WikiHow's bracketed artifacts)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


class HellaSwag(TaskType):
    name = "hellaswag"
    fields = "ctx (or activity_label, ctx_a, ctx_b), endings[4], label"
    metrics = ("acc", "acc_norm")
    primary = "acc_norm"

    def matches(self, row):
        return "endings" in row and ("ctx" in row or "ctx_a" in row)

    def parse(self, item_id, row, *, subject):
        if "ctx_a" in row:
            ctx = require_text(row, "ctx_a") + " " + require_text(row, "ctx_b").capitalize()
            if row.get("activity_label"):
                ctx = row["activity_label"] + ": " + ctx
        else:
            ctx = require_text(row, "ctx")
            if row.get("activity_label") and not ctx.startswith(row["activity_label"] + ":"):
                ctx = row["activity_label"] + ": " + ctx
        endings = text_choices(require(row, "endings"), "endings")
        label = row.get("label")
        if label is None or label == "":
            raise ItemError("no label (HellaSwag's test split is unlabelled)")
        gold = answer_index(label, len(endings), "label")
        return Doc(item_id, hellaswag_preprocess(ctx), [hellaswag_preprocess(e) for e in endings], gold)


class WinoGrande(TaskType):
    """Partial scoring: each option fills the blank in the context; the rest of the sentence is scored."""

    name = "winogrande"
    fields = "sentence (with one '_'), option1, option2, answer ('1' or '2')"

    def matches(self, row):
        return "sentence" in row and "option1" in row and "option2" in row

    def parse(self, item_id, row, *, subject):
        sentence = require_text(row, "sentence")
        if sentence.count("_") != 1:
            raise ItemError(f"the sentence has {sentence.count('_')} blanks '_', expected one")
        answer = row.get("answer")
        if answer is None or str(answer).strip() == "":
            raise ItemError("no answer (WinoGrande's test split is unlabelled)")
        if str(answer).strip() not in ("1", "2"):
            raise ItemError(f"answer {answer!r} is out of range: expected '1' or '2'")
        i = sentence.index("_")
        contexts = [sentence[:i] + require_text(row, "option1"), sentence[:i] + require_text(row, "option2")]
        return Doc(item_id, "", contexts, int(str(answer).strip()) - 1, extra={"target": sentence[i + 1:].strip()})

    def fewshot_example(self, doc):
        return doc.choices[doc.gold] + self.target_delimiter + doc.extra["target"]

    def requests(self, doc, prefix):
        return [(prefix + c, self.target_delimiter + doc.extra["target"]) for c in doc.choices]


TRUTHFULQA_PROMPT = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain.")


def _targets(value, what: str) -> tuple[list[str], list[int]]:
    if isinstance(value, dict) and "choices" in value and "labels" in value:
        choices, labels = list(value["choices"]), [int(x) for x in value["labels"]]
    elif isinstance(value, dict):
        choices, labels = list(value), [int(x) for x in value.values()]
    else:
        raise ItemError(f"{what} must be {{choices, labels}} or {{answer: 0/1}}")
    text_choices(choices, what)
    if len(labels) != len(choices) or any(x not in (0, 1) for x in labels):
        raise ItemError(f"{what}: one 0/1 label per choice expected")
    if 1 not in labels:
        raise ItemError(f"{what} has no true answer")
    return choices, labels


class TruthfulQA(TaskType):
    """MC1: is the single true answer the most likely; MC2: the probability mass of the true answers."""

    name = "truthfulqa"
    fields = "question, mc1_targets, mc2_targets (each {choices, labels} or {answer: 0/1})"
    metrics = ("mc1", "mc2")
    primary = "mc2"

    def matches(self, row):
        return "mc1_targets" in row and "mc2_targets" in row

    def parse(self, item_id, row, *, subject):
        mc1, mc1_labels = _targets(require(row, "mc1_targets"), "mc1_targets")
        if mc1_labels.count(1) != 1:
            raise ItemError(f"mc1_targets has {mc1_labels.count(1)} true answers, expected one")
        mc2, mc2_labels = _targets(require(row, "mc2_targets"), "mc2_targets")
        query = TRUTHFULQA_PROMPT + "\n\nQ: " + require_text(row, "question") + "\nA:"
        return Doc(item_id, query, mc1, mc1_labels.index(1), extra={"mc2": mc2, "mc2_labels": mc2_labels})

    def fewshot_example(self, doc):
        raise ItemError("TruthfulQA has its fixed six-question prompt; it takes no few-shot examples")

    def requests(self, doc, prefix):
        return [(doc.query, " " + c) for c in doc.choices + doc.extra["mc2"]]

    def score(self, doc, logprobs):
        mc1 = logprobs[:len(doc.choices)]
        mc2 = logprobs[len(doc.choices):]
        total = _logsumexp(mc2)
        true = _logsumexp([lp for lp, y in zip(mc2, doc.extra["mc2_labels"]) if y == 1])
        return {"mc1": float(_argmax(mc1) == doc.gold), "mc2": math.exp(true - total)}


def _logsumexp(values: Sequence[float]) -> float:
    m = max(values)
    return m + math.log(math.fsum(math.exp(v - m) for v in values))


class Belebele(TaskType):
    name = "belebele"
    fields = "flores_passage, question, mc_answer1..mc_answer4, correct_answer_num"
    metrics = ("acc", "acc_norm")

    def matches(self, row):
        return "flores_passage" in row and "mc_answer1" in row

    def parse(self, item_id, row, *, subject):
        answers = [require_text(row, f"mc_answer{k}") for k in range(1, 5)]
        number = str(require(row, "correct_answer_num")).strip()
        if number not in ("1", "2", "3", "4"):
            raise ItemError(f"correct_answer_num {number!r} is out of range: expected 1-4")
        gold = int(number) - 1
        query = (f"P: {require_text(row, 'flores_passage')}\nQ: {require_text(row, 'question').strip()}\n"
                 + "".join(f"{LETTERS[k]}: {a}\n" for k, a in enumerate(answers)) + "Answer:")
        return Doc(item_id, query, list("ABCD"), gold)


# GSM8K, as lm-eval's gsm8k task (regexes and normalization verbatim).
GSM8K_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
GSM8K_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
GSM8K_IGNORE = (",", "\\$", "(?s).*#### ", "\\.$")
GSM8K_STOP = ("Question:", "</s>", "<|im_end|>", "\n\n")


def gsm8k_extract(text: str, *, flexible: bool) -> str:
    """lm-eval's filters: strict takes the first '#### N'; flexible the last number-like match."""
    matches = (GSM8K_FLEXIBLE if flexible else GSM8K_STRICT).findall(text)
    if not matches:
        return "[invalid]"
    match = matches[-1] if flexible else matches[0]
    if isinstance(match, tuple):
        match = next((m for m in match if m), "[invalid]")
    return match.strip()


def gsm8k_normalize(text: str) -> str:
    for pattern in GSM8K_IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()


class GSM8K(TaskType):
    name = "gsm8k"
    fields = "question, answer (text ending in '#### N')"
    metrics = ("exact_match_strict", "exact_match_flexible")
    primary = "exact_match_strict"
    generation = True
    default_fewshot = 5

    def matches(self, row):
        return "question" in row and isinstance(row.get("answer"), str) and "choices" not in row \
            and "choice0" not in row

    def parse(self, item_id, row, *, subject):
        answer = require_text(row, "answer")
        if "####" not in answer:
            raise ItemError("the answer has no final '#### N' line to compare against")
        return Doc(item_id, f"Question: {require_text(row, 'question')}\nAnswer:", [answer], 0)

    def score_generation(self, doc: Doc, text: str) -> dict[str, float]:
        target = gsm8k_normalize(doc.choices[0])
        return {"exact_match_strict": float(gsm8k_normalize(gsm8k_extract(text, flexible=False)) == target),
                "exact_match_flexible": float(gsm8k_normalize(gsm8k_extract(text, flexible=True)) == target)}


# Detection order matters: the most specific field sets first (GSM8K's question+answer is a subset of MMLU's).
TASK_TYPES: dict[str, TaskType] = {t.name: t for t in (TruthfulQA(), Belebele(), WinoGrande(), HellaSwag(), ARC(),
                                                       MMLU(), GSM8K())}


def detect_type(rows: Sequence[tuple[str, dict]], path: Path) -> TaskType:
    for _, row in rows[:1]:
        for t in TASK_TYPES.values():
            if t.matches(row):
                return t
    got = ", ".join(sorted(rows[0][1])) if rows else "no items"
    expected = "\n".join(f"  {t.name}: {t.fields}" for t in TASK_TYPES.values())
    raise UserError(f"{path}: cannot tell the task type from the fields ({got}); give --task-type or a file with "
                    f"the fields of one of:\n{expected}")


# ---------------------------------------------------------------------------------------------------- task loading

@dataclass
class Task:
    name: str
    type: TaskType
    path: Path
    files: list[Path]                                   # the data files read (hashed into the results)
    docs: list[Doc]
    skipped: list[tuple[str, str]]                      # (item id, reason)
    fewshot: dict[str | None, list[Doc]] = field(default_factory=dict)  # subject (None: any) -> examples
    fewshot_files: list[Path] = field(default_factory=list)
    num_fewshot: int = 0
    notes: list[str] = field(default_factory=list)


def default_task_name(path: Path) -> str:
    if path.is_dir():
        return path.parent.name if path.name in ("test", "dev", "val", "validation") else path.name
    return path.stem


def load_docs(files: Sequence[Path], *, task_type: str | None, path: Path, limit: int | None = None
              ) -> tuple[TaskType, list[Doc], list[tuple[str, str]]]:
    """Read, detect and parse; `limit` keeps the first n scorable items of each file."""
    kind: TaskType | None = TASK_TYPES[task_type] if task_type else None
    docs, skipped = [], []
    for f in files:
        rows = read_records(f)
        if not rows:
            continue
        if kind is None:
            kind = detect_type(rows, f)
        elif task_type is None and not kind.matches(rows[0][1]):
            raise UserError(f"{f} does not look like the other {kind.name} files of {path} (fields "
                            f"{', '.join(sorted(rows[0][1]))})")
        subject = subject_from_filename(f) if len(files) > 1 or kind.name == "mmlu" else None
        kept = 0
        for item_id, row in rows:
            if limit is not None and kept >= limit:
                break
            try:
                docs.append(kind.parse(item_id, row, subject=subject))
                kept += 1
            except ItemError as exc:
                skipped.append((item_id, str(exc)))
    if kind is None:
        raise UserError(f"{path} holds no items")
    return kind, docs, skipped


def _sibling_split(path: Path, split: str) -> Path | None:
    """mmlu/test/x_test.csv -> mmlu/dev/x_dev.csv (test -> `split` in the file and folder names), if it exists."""
    if "test" not in path.name:
        return None
    parent = path.parent.parent / path.parent.name.replace("test", split) if "test" in path.parent.name \
        else path.parent
    candidate = parent / path.name.replace("test", split)
    return candidate if candidate.is_file() and candidate != path else None


def load_task(spec: str, *, task_type: str | None = None, limit: int | None = None) -> Task:
    """A task from "PATH" or "NAME=PATH" (zero-shot until `attach_fewshot`)."""
    name, path = split_named(spec)
    path = Path(path)
    files = benchmark_files(path)
    kind, docs, skipped = load_docs(files, task_type=task_type, path=path, limit=limit)
    return Task(name or default_task_name(path), kind, path, files, docs, skipped)


def attach_fewshot(task: Task, *, fewshot: str | None = None, num_fewshot: int | None = None) -> Task:
    """Few-shot examples from `fewshot` (a file or folder) or the dev/train file next to each test file."""
    kind = task.type
    n = kind.default_fewshot if num_fewshot is None else num_fewshot
    if n < 0:
        raise UserError(f"--num-fewshot must be >= 0, got {n}")
    if n and kind.name == "truthfulqa":
        task.notes.append("TruthfulQA uses its fixed six-question prompt; --num-fewshot ignored")
        n = 0
    if n:
        if fewshot is not None:
            shot_files = benchmark_files(Path(fewshot))
        else:
            shot_files = [s for f in task.files for s in [_sibling_split(f, "dev") or _sibling_split(f, "train")]
                          if s]
        if not shot_files:
            task.notes.append(f"{n}-shot asked but no few-shot file was given (--fewshot-file) or found next to "
                              f"{task.path}: zero-shot")
            n = 0
        else:
            _, shots, bad = load_docs(shot_files, task_type=kind.name, path=Path(fewshot or shot_files[0]))
            if bad:
                task.notes.append(f"{len(bad)} few-shot item(s) unusable, e.g. {bad[0][0]}: {bad[0][1]}")
            for d in shots:
                task.fewshot.setdefault(d.subject, []).append(d)
            short = {k: len(v) for k, v in task.fewshot.items() if len(v) < n}
            if short or not task.fewshot:
                subject, have = next(iter(short.items()), (None, 0))
                about = f" for subject {subject}" if subject else ""
                raise UserError(f"{task.name}: {n}-shot asked but the few-shot file(s) ({shot_files[0]}"
                                f"{' ...' if len(shot_files) > 1 else ''}) hold only {have} usable example(s){about}; "
                                f"lower --num-fewshot or give a larger --fewshot-file")
            task.fewshot_files = list(shot_files)
    task.num_fewshot = n
    return task


def split_named(spec: str) -> tuple[str | None, str]:
    """"NAME=PATH" -> (NAME, PATH); a plain path (even one containing '=') -> (None, PATH)."""
    if "=" in spec and not Path(spec).exists():
        name, path = spec.split("=", 1)
        if name and "/" not in name:
            return name, path
    return None, spec


def fewshot_prefix(task: Task, doc: Doc) -> str:
    """lm-eval's context before the item: the description, then n solved examples each followed by a blank line."""
    prefix = task.type.description(doc)
    if task.num_fewshot:
        pool = task.fewshot.get(doc.subject) or (task.fewshot.get(None) if doc.subject else None)
        if pool is None and len(task.fewshot) == 1:
            pool = next(iter(task.fewshot.values()))
        if not pool:
            raise ItemError(f"no few-shot examples for subject {doc.subject!r}")
        shots = [d for d in pool if d.query != doc.query or d.choices != doc.choices][:task.num_fewshot]
        if len(shots) < task.num_fewshot:
            raise ItemError(f"{task.num_fewshot}-shot asked but only {len(shots)} example(s) for subject "
                            f"{doc.subject!r}")
        prefix += "".join(task.type.fewshot_example(d) + task.type.fewshot_delimiter for d in shots)
    return prefix
