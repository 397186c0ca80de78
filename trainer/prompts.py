"""Multiple-choice prompts (MMLU) for the Fisher: formatting the prompt, tokenizing it so that exactly the
answer letter is scored. The items come from trainer.task_files (one reader for eval and the Fisher).

    items = read_mmlu("mmlu/test")                       # trainer.task_files: CSV dir/file, or HF Parquet / JSON(L)
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

import os
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from trainer.errors import UserError
from trainer.task_files import LETTERS, MCItem

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
