"""Mini-batches for the Fisher: MMLU prompts scored on the answer letter, or packed text rows.

A global mini-batch holds `batch_size` samples (prompts, or rows of text); on W ranks, rank r takes samples
r, r+W, r+2W, ... of it, and a rank left without a sample (batch_size < W, or a short last mini-batch) gets a
dummy with no scored token, because every rank must run every forward/backward under FSDP2.

Text rows come from the data package's packer (the rows training sees). Prompts are packed here: several per row,
position_ids restarting at 0 at each one (attention never crosses a prompt), rows padded to a common length with
padding "documents" whose labels are -100. Only the last prompt position is scored, against the answer letter's
token (prompts.answer_letter_tokens). Padding is never scored and no real token attends to it, so it gets an
exact zero gradient: the Fisher does not depend on how the prompts are laid out or padded (up to rounding).

Fixed shapes (`fixed_shapes=True`, what the fisher command uses on CUDA). FlexAttention is compiled with static
shapes (trainer.attention): every new [B, S] is a new compilation of its forward and backward kernels, and past
dynamo's recompile limit (8 per function) it runs unfused. Packed tight, nearly every mini-batch is a new shape
(prompt lengths vary: 23 to 46 shapes per rank in 64 mini-batches of 4 shuffled MMLU prompts). With fixed shapes
a run of prompts uses at most `max_shapes` (4) shapes, planned before the first batch (`plan_shapes`) from every
prompt's length, which every rank has, so the ranks agree without communicating:

- each part of a global mini-batch (one rank's prompts) needs one row of its total length rounded up to a
  multiple of 128 (FlexAttention's block size), or, when that exceeds cap = max(row_tokens, the longest prompt)
  rounded up to 128, as many rows of `cap` as packing it first fit in order takes;
- the mini-batch needs the largest of its parts' needs, and every rank's part (a dummy included) gets the same
  shape: under FSDP2 every rank waits for the slowest at each layer's collectives, so evening them out costs no
  wall time, and the ranks compile the same shapes;
- of all these needs, `choose_shapes` keeps at most `max_shapes` such that padding each mini-batch up to the
  smallest kept shape that holds it computes the fewest positions (exact, by dynamic programming). The widths
  follow the data (multiples of 128, e.g. 512, 640, 768, 1280) rather than a fixed ladder.

Text rows are [ceil(min(batch_size, rows) / W), seq_len] always, short parts and the dummy filled up with rows of
padding only: one shape.

The trade-off: padding costs FLOPs, compilations cost time (and memory for the kernels). Measured on 256 shuffled
MMLU test prompts, mini-batches of 4, lengths counted in words and punctuation marks (72 to 600, mean 143; a
stand-in for Gemma's tokenizer): +15% positions on one rank, +20% on 2, +35% on 4 or 8 (on the slowest rank of
each step, which sets the pace); with a 1000-piece SentencePiece model (lengths 129 to 1304) +12%, +21%, +24%.
Powers-of-two widths (3 to 4 shapes) would cost +42..49%, a ladder with a step inside each octave (x1.5) +18..32%
for 5 to 6 shapes, close to the recompile limit. The padding is laid out as documents of at most 128 tokens
ending on 128-token boundaries, so FlexAttention computes only their diagonal blocks: attention over padding
costs linear in its length, not quadratic; the linear layers (most of the FLOPs) pay for it in full. Each batch
carries "num_tokens" (the positions holding data) beside its shape, and fisher.FisherStats counts both, so the
padding share is reported rather than hidden in the token rate.
"""

from __future__ import annotations

import itertools
import os
from collections import Counter
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


BLOCK = 128  # FlexAttention's block size: the narrowest fixed width, and the longest padding document


def padding_positions(start: int, stop: int, *, block: int = BLOCK) -> torch.Tensor:
    """position_ids for padding at row indices [start, stop): documents of at most `block` tokens that end on
    multiples of `block`, so block-sparse attention (FlexAttention) computes only their diagonal blocks."""
    index = torch.arange(start, stop)
    return index - (index // block * block).clamp(min=start)


def _padding(rows: int, width: int, pad_id: int) -> dict[str, torch.Tensor]:
    """`rows` rows of padding only: never scored, each its own documents."""
    return {"input_ids": torch.full((rows, width), pad_id, dtype=torch.long),
            "labels": torch.full((rows, width), IGNORE_INDEX, dtype=torch.long),
            "position_ids": padding_positions(0, width).repeat(rows, 1)}


def _dummy(pad_id: int, shape: tuple[int, int] = (1, 8)) -> dict[str, torch.Tensor]:
    """The part of a rank without a sample: padding only (see the module doc)."""
    return _padding(*shape, pad_id) | {"num_samples": 0, "num_tokens": 0}


def _first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices grouped into rows of at most `capacity` tokens: each into the first row with room, in order."""
    rows: list[list[int]] = []
    fill: list[int] = []
    for i, n in enumerate(lengths):
        for r, used in enumerate(fill):
            if used + n <= capacity:
                rows[r].append(i)
                fill[r] += n
                break
        else:
            rows.append([i])
            fill.append(n)
    return rows


def _need(lengths: Sequence[int], *, cap: int, block: int = BLOCK) -> tuple[int, int]:
    """The smallest [rows, width] that holds prompts of these `lengths` packed first fit in order: one row of the
    total rounded up to a multiple of `block` when that fits in `cap`, else as many rows of `cap` as first fit
    needs. As tuples these shapes sort by size, and a larger one holds whatever a smaller one holds: all shapes
    of more than one row are `cap` wide."""
    total = sum(lengths)
    if total <= cap:
        return 1, max(-(-total // block) * block, block)
    return len(_first_fit(lengths, cap)), cap


def choose_shapes(needs: Sequence[tuple[int, int]], max_shapes: int) -> list[tuple[int, int]]:
    """At most `max_shapes` of the shapes `needs` (with repeats: one per mini-batch), sorted, such that giving each
    mini-batch the smallest chosen shape that holds its need computes the fewest positions in all. Exact, by
    dynamic programming over the distinct needs in order (each chosen shape serves a run of consecutive needs and
    is the largest of them); on a tie, fewer shapes."""
    if max_shapes < 1:
        raise ValueError(f"max_shapes must be at least 1, got {max_shapes}")
    distinct = sorted(set(needs))
    counts = Counter(needs)
    below = list(itertools.accumulate((counts[d] for d in distinct), initial=0))  # needs before distinct[j]
    m = len(distinct)
    # best[j] = (positions, shapes) serving distinct[:j] with at most the shapes allowed so far.
    best: list[tuple[float, list[tuple[int, int]]]] = [(0, [])] + [(float("inf"), [])] * m
    for _ in range(max_shapes):
        step = best[:]
        for j in range(1, m + 1):
            rows, width = distinct[j - 1]
            for i in range(j):
                cost = best[i][0] + (below[j] - below[i]) * rows * width
                if cost < step[j][0]:
                    step[j] = (cost, best[i][1] + [distinct[j - 1]])
        best = step
    return best[m][1]


def plan_shapes(lengths: Sequence[int], *, batch_size: int, world_size: int = 1, row_tokens: int = 4096,
                max_shapes: int = 4, block: int = BLOCK) -> list[tuple[int, int]]:
    """The fixed [rows, width] of each global mini-batch of prompts of these `lengths` (module doc): the same on
    every rank, at most `max_shapes` distinct, the fewest padded positions given that."""
    cap = -(-max(row_tokens, max(lengths, default=1)) // block) * block
    needs = [max(_need(lengths[start:start + batch_size][r::world_size], cap=cap, block=block)
                 for r in range(min(world_size, len(lengths) - start)))
             for start in range(0, len(lengths), batch_size)]
    chosen = choose_shapes(needs, max_shapes)
    return [next(shape for shape in chosen if shape >= need) for need in needs]


def pack_prompts(prompts: Sequence[EncodedPrompt], *, pad_id: int, row_tokens: int = 4096,
                 multiple: int = 8, shape: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """Prompts -> one batch, packed first fit in order.

    Without `shape`: rows of at most max(row_tokens, longest prompt) tokens, as many as needed, all as long as the
    fullest one rounded up to `multiple`. With `shape` (rows, width): exactly that shape, the prompts packed into
    rows of `width`, then rows of padding only (a ValueError if they do not fit).
    """
    if not prompts:
        return _dummy(pad_id, shape or (1, 8))
    lengths = [len(p.ids) for p in prompts]
    if shape is None:
        groups = _first_fit(lengths, max(row_tokens, max(lengths)))
        fills = [sum(lengths[i] for i in g) for g in groups]
        n_rows, length = len(groups), -(-max(fills) // multiple) * multiple
    else:
        n_rows, length = shape
        groups = _first_fit(lengths, length)
        if max(lengths) > length or len(groups) > n_rows:
            raise ValueError(f"{len(prompts)} prompts of {sum(lengths)} tokens (longest {max(lengths)}) do not fit "
                             f"{n_rows} rows of {length}")
    batch = _padding(n_rows, length, pad_id)
    input_ids, labels, position_ids = batch["input_ids"], batch["labels"], batch["position_ids"]
    for r, group in enumerate(groups):
        at = 0
        for i in group:
            p, n = prompts[i], lengths[i]
            input_ids[r, at:at + n] = torch.tensor(p.ids)
            position_ids[r, at:at + n] = torch.arange(n)
            labels[r, at + n - 1] = p.target
            at += n
        position_ids[r, at:] = padding_positions(at, length)  # padding: documents of their own, never scored
    return batch | {"num_samples": len(prompts), "num_tokens": sum(lengths)}


def prompt_batches(prompts: Sequence[EncodedPrompt], *, batch_size: int, pad_id: int, rank: int = 0,
                   world_size: int = 1, row_tokens: int = 4096, fixed_shapes: bool = False, max_shapes: int = 4
                   ) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's part of each global mini-batch of `batch_size` prompts, in order.

    fixed_shapes: every rank's part of a mini-batch has the mini-batch's shape from `plan_shapes` (module doc;
    every rank plans every part from `prompts`, without communication), at most `max_shapes` distinct in the run;
    otherwise each part is packed tight (pack_prompts without `shape`) and a part without a prompt is [1, 8].
    """
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    shapes = (plan_shapes([len(p.ids) for p in prompts], batch_size=batch_size, world_size=world_size,
                          row_tokens=row_tokens, max_shapes=max_shapes) if fixed_shapes else None)
    for k, start in enumerate(range(0, len(prompts), batch_size)):
        mine = list(prompts[start:start + batch_size])[rank::world_size]
        if shapes is None:
            yield pack_prompts(mine, pad_id=pad_id, row_tokens=row_tokens)
        else:
            yield pack_prompts(mine, pad_id=pad_id, shape=shapes[k])


def row_batches(rows: dict[str, np.ndarray], *, batch_size: int, pad_id: int, rank: int = 0, world_size: int = 1,
                fixed_shapes: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's part of each global mini-batch of `batch_size` packed rows, in order.

    fixed_shapes: every part is [ceil(min(batch_size, rows) / world_size), seq_len], a short part (the last
    mini-batch, or a rank with fewer rows) filled up with rows of padding only, and so is the dummy; otherwise
    parts are as many rows as they hold and the dummy is [1, 8].
    """
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    n, seq_len = rows["input_ids"].shape
    per_rank = -(-min(batch_size, n) // world_size)
    for start in range(0, n, batch_size):
        index = np.arange(start, min(start + batch_size, n))[rank::world_size]
        if len(index) == 0:
            yield _dummy(pad_id, (per_rank, seq_len) if fixed_shapes else (1, 8))
            continue
        batch = {k: torch.from_numpy(np.ascontiguousarray(rows[k][index])).long()
                 for k in ("input_ids", "labels", "position_ids")}
        if fixed_shapes and len(index) < per_rank:
            fill = _padding(per_rank - len(index), seq_len, pad_id)
            batch = {k: torch.cat([v, fill[k]]) for k, v in batch.items()}
        yield batch | {"num_samples": len(index), "num_tokens": len(index) * seq_len}


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
