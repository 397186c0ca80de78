"""Mini-batches for the Fisher: MMLU prompts scored on the answer letter, or packed text rows.

A global mini-batch holds `batch_size` samples (prompts, or rows of text); on W ranks, rank r takes samples
r, r+W, r+2W, ... of it, and a rank left without a sample (batch_size < W, or a short last mini-batch) gets a
one-row dummy with no scored token, because every rank must run every forward/backward under FSDP2.

Text rows come from the data package's packer (the rows training sees). Prompts are packed here: several per row, position_ids restarting at 0 at each one (attention never crosses a prompt),
rows padded to a common length with a padding "document" whose labels are -100. Only the last prompt position is
scored, against the answer letter's token (prompts.answer_letter_tokens).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from kernels.linear_cross_entropy import IGNORE_INDEX
from trainer.data.packing import pack_documents
from trainer.data.readers import expand_inputs, read_documents
from trainer.data.tokenize import load_tokenizer, tokenize_texts
from trainer.errors import UserError
from trainer.prompts import DEFAULT_MMLU_TEMPLATE, answer_letter_tokens, format_mmlu_prompt
from trainer.task_files import MCItem


@dataclass
class EncodedPrompt:
    ids: list[int]  # BOS + prompt tokens up to (not including) the answer
    target: int  # the answer letter's token, predicted at the last position


def encode_mmlu(items: Sequence[MCItem], sp, *, bos_id: int | None, template: str = DEFAULT_MMLU_TEMPLATE
                ) -> list[EncodedPrompt]:
    out = []
    for item in items:
        p = format_mmlu_prompt(item.question, item.choices, item.subject, template=template)
        ids, target = answer_letter_tokens(sp, p.prompt, p.answer(item.answer), bos_id=bos_id)
        out.append(EncodedPrompt(ids, target))
    return out


def _dummy(pad_id: int) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.full((1, 8), pad_id, dtype=torch.long),
            "labels": torch.full((1, 8), IGNORE_INDEX, dtype=torch.long),
            "position_ids": torch.arange(8).unsqueeze(0), "num_samples": 0}


def pack_prompts(prompts: Sequence[EncodedPrompt], *, pad_id: int, row_tokens: int = 4096,
                 multiple: int = 8) -> dict[str, torch.Tensor]:
    """Prompts -> one batch: rows of at most max(row_tokens, longest prompt) tokens, first fit in order."""
    if not prompts:
        return _dummy(pad_id)
    capacity = max(row_tokens, max(len(p.ids) for p in prompts))
    rows: list[list[EncodedPrompt]] = []
    fill: list[int] = []
    for p in prompts:
        for i, used in enumerate(fill):
            if used + len(p.ids) <= capacity:
                rows[i].append(p)
                fill[i] += len(p.ids)
                break
        else:
            rows.append([p])
            fill.append(len(p.ids))
    length = -(-max(fill) // multiple) * multiple
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), length), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for p in row:
            n = len(p.ids)
            input_ids[r, at:at + n] = torch.tensor(p.ids)
            position_ids[r, at:at + n] = torch.arange(n)
            labels[r, at + n - 1] = p.target
            at += n
        position_ids[r, at:] = torch.arange(length - at)  # padding: a document of its own, never scored
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "num_samples": len(prompts)}


def prompt_batches(prompts: Sequence[EncodedPrompt], *, batch_size: int, pad_id: int, rank: int = 0,
                   world_size: int = 1, row_tokens: int = 4096) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's part of each global mini-batch of `batch_size` prompts, in order."""
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    for start in range(0, len(prompts), batch_size):
        mine = list(prompts[start:start + batch_size])[rank::world_size]
        yield pack_prompts(mine, pad_id=pad_id, row_tokens=row_tokens)


def row_batches(rows: dict[str, np.ndarray], *, batch_size: int, pad_id: int, rank: int = 0, world_size: int = 1
                ) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's part of each global mini-batch of `batch_size` packed rows, in order."""
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    n = len(rows["input_ids"])
    for start in range(0, n, batch_size):
        index = np.arange(start, min(start + batch_size, n))[rank::world_size]
        if len(index) == 0:
            yield _dummy(pad_id)
            continue
        yield {k: torch.from_numpy(np.ascontiguousarray(rows[k][index])).long()
               for k in ("input_ids", "labels", "position_ids")} | {"num_samples": len(index)}


def text_rows(path: str | os.PathLike, *, tokenizer: str | os.PathLike, seq_len: int, text_field: str = "text",
              pad_id: int | None = None, max_rows: int | None = None) -> tuple[dict[str, np.ndarray], list[Path]]:
    """Documents of a corpus file or directory (JSON Lines, Parquet, plain text), tokenized and packed into rows
    of `seq_len` exactly as training packs them (trainer.data: readers, tokenizer, packer): BOS + tokens + EOS per
    document, a long document continuing in the next row, labels -100 where the next token is another document's
    BOS and under padding. With `max_rows`, reading stops once the first `max_rows` rows are complete (they equal
    the first rows of the whole corpus). Returns (int64 input_ids, labels, position_ids [rows, seq_len], files).
    """
    tok = load_tokenizer(tokenizer)
    files = expand_inputs([path])
    texts = (text for f in files for text in read_documents(f, text_field=text_field))
    # Row r's last label is stream token (r + 1) * seq_len: enough rows are complete once the stream is longer.
    needed = None if max_rows is None else max_rows * seq_len + 1
    docs, stream = [], 0
    while needed is None or stream < needed:
        chunk = list(itertools.islice(texts, 256))
        if not chunk:
            break
        for d in tokenize_texts(chunk, tokenizer=tok):
            if len(d):
                docs.append(d)
                stream += len(d) + 2  # BOS + tokens + EOS
    if not docs:
        raise UserError(f"{path}: no non-empty documents")
    rows = pack_documents(docs, seq_len, bos_id=tok.bos_id, eos_id=tok.eos_id,
                          pad_id=tok.pad_id if pad_id is None else pad_id)
    if max_rows is not None:
        rows = {k: v[:max_rows] for k, v in rows.items()}
    return rows, files
