"""Mini-batches for the Fisher: MMLU prompts scored on the answer letter, or packed text rows.

A global mini-batch holds `batch_size` samples (prompts, or rows of text); on W ranks, rank r takes samples
r, r+W, r+2W, ... of it, and a rank left without a sample (batch_size < W, or a short last mini-batch) gets a
one-row dummy with no scored token, because every rank must run every forward/backward under FSDP2.

Prompts are packed: several per row, position_ids restarting at 0 at each one (attention never crosses a prompt),
rows padded to a common length with a padding "document" whose labels are -100. Only the last prompt position is
scored, against the answer letter's token (prompts.answer_letter_tokens).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from trainer.errors import UserError
from trainer.prompts import DEFAULT_MMLU_TEMPLATE, MCItem, answer_letter_tokens, format_mmlu_prompt

IGNORE_INDEX = -100


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


def text_rows(path: str | os.PathLike, *, tokenizer: str | os.PathLike, seq_len: int, bos_id: int | None = None,
              eos_id: int | None = None, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Documents of plain-text files (blank-line separated), tokenized and packed into rows of `seq_len`.

    Stand-in for the data package (trainer.data: readers, tokenization, packer), which had not landed when this
    was written; it follows the packer's contract so that switching changes no number: each document is
    BOS + tokens + EOS in one stream, cut into rows (a long document continues in the next row, positions
    counting on), position_ids restart at 0 at each BOS, labels[t] = stream[t + 1] except where that token is a
    BOS or padding (nothing predicts them); the last row is padded with a "document" of pad_id whose labels are
    -100. Returns int64 arrays input_ids, labels, position_ids, each [rows, seq_len].
    """
    import sentencepiece as spm

    files = corpus_files(path)
    unsupported = [f for f in files if f.suffix not in (".txt", ".text", "")]
    if unsupported:
        raise UserError(f"{unsupported[0]}: --format text reads plain-text files (documents separated by blank "
                        f"lines) in this version")
    docs = [d.strip() for f in files for d in f.read_text(encoding="utf-8", errors="replace").split("\n\n")]
    docs = [d for d in docs if d]
    if not docs:
        raise UserError(f"{path}: no non-empty documents")
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    bos = sp.bos_id() if bos_id is None else bos_id
    eos = sp.eos_id() if eos_id is None else eos_id
    if bos < 0 or eos < 0:
        raise UserError(f"{tokenizer}: the tokenizer defines no BOS/EOS token")
    pieces = [[bos, *ids, eos] for ids in sp.encode(docs)]
    stream = np.fromiter((t for doc in pieces for t in doc), dtype=np.int64)
    positions = np.concatenate([np.arange(len(doc)) for doc in pieces])
    n_rows = -(-len(stream) // seq_len)
    pad = n_rows * seq_len - len(stream)
    stream = np.concatenate([stream, np.full(pad, pad_id)])
    positions = np.concatenate([positions, np.arange(pad)])
    real = n_rows * seq_len - pad
    labels = np.full_like(stream, IGNORE_INDEX)
    predictable = positions[1:real] != 0  # the next token continues the same document (it is not a BOS)
    labels[:real - 1] = np.where(predictable, stream[1:real], IGNORE_INDEX)  # padding predicts and is nothing
    return {"input_ids": stream.reshape(n_rows, seq_len), "labels": labels.reshape(n_rows, seq_len),
            "position_ids": positions.reshape(n_rows, seq_len)}


def corpus_files(path: str | os.PathLike) -> list[Path]:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or directory")
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
