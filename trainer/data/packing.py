"""Packing: documents laid end to end as [BOS, tokens..., EOS] and cut into rows of exactly `seq_len` tokens.

An epoch's *stream* is the non-empty documents in a given order, each as BOS, its tokens, EOS. Row r holds stream
positions [r*S, r*S + S) as inputs; its labels are positions [r*S + 1, r*S + S + 1), the next token at each
position, so one token per row overlaps the next row. Nothing is dropped, nothing truncated: a document longer
than a row continues in the next one.

Per row, all int64 [rows, S] (the `Batch` contract):
- `input_ids`: the stream.
- `position_ids`: 0 at each BOS, counting up through the document's tokens and its EOS; a document continued from
  the previous row keeps counting, so a row that starts mid-document starts at a position > 0. The model takes
  each 0 as the start of a new attention segment.
- `labels`: the next stream token, except -100 (not scored) where the next token is the BOS of another document
  (a document's EOS does not predict the next document), and under padding.
- The last row of an epoch is padded to S with `pad_id`; padding has label -100 and positions 0, 1, 2, ...
  (a segment of its own, so no real token attends to it), and the token before it has label -100 too.
  So every token of every non-empty document appears exactly once per epoch, in order; empty documents
  contribute nothing (they are skipped, not packed as a bare BOS, EOS).

Rows are built per call for any set of row numbers (the loader asks for a batch at a time), vectorized, with no
Python work per token: the segments a window of the stream touches are found with searchsorted, the tokens are
gathered by one `b"".join` of memoryviews into the token shards (per piece far cheaper than np.concatenate),
and the three outputs are a few whole-array passes (two casting copies, a repeat, one scatter). Consecutive rows
(the loader's usual batch) are one window; `pack_documents_ref` spells the same result out token by token.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import numpy as np

# The label that is not scored is the loss's to define (torch's cross_entropy default); re-exported for the data docs.
from kernels.linear_cross_entropy import IGNORE_INDEX
TOKEN_DTYPE = np.dtype("<u4")
BATCH_KEYS = ("input_ids", "labels", "position_ids")


@dataclasses.dataclass(frozen=True)
class TokenSource:
    """Documents' tokens as the packer reads them: uint32 shards laid end to end, and document offsets in that
    global order (a `TokenStore` has exactly these attributes; `token_source` makes one from arrays)."""

    shards: Sequence[np.ndarray]
    shard_starts: np.ndarray  # int64 [len(shards) + 1]
    doc_offsets: np.ndarray  # int64 [documents + 1]


def token_source(documents) -> TokenSource:
    """A TokenStore, a TokenSource, or a list of 1-D integer arrays (one per document) as a TokenSource."""
    if hasattr(documents, "shards") and hasattr(documents, "doc_offsets"):
        return documents
    docs = [np.asarray(d) for d in documents]
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate(docs).astype(np.uint32) if docs else np.zeros(0, np.uint32)
    return TokenSource([flat], np.array([0, len(flat)], dtype=np.int64), offsets)


@dataclasses.dataclass(frozen=True)
class EpochLayout:
    """Where each document sits in one epoch's stream.

    `order`: the non-empty documents in stream order; segment k (document order[k] with its BOS and EOS) covers
    stream positions [seg_starts[k], seg_starts[k + 1]). `num_rows` = ceil(stream length / seq_len).
    """

    seq_len: int
    order: np.ndarray
    seg_starts: np.ndarray

    @property
    def stream_len(self) -> int:
        return int(self.seg_starts[-1])

    @property
    def num_rows(self) -> int:
        return -(-self.stream_len // self.seq_len)


def epoch_layout(doc_lengths: np.ndarray, seq_len: int, order: np.ndarray | None = None) -> EpochLayout:
    """The layout of documents in `order` (default: store order); empty documents are left out."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    lengths = np.asarray(doc_lengths, dtype=np.int64)
    order = np.arange(len(lengths), dtype=np.int64) if order is None else np.asarray(order, dtype=np.int64)
    order = order[lengths[order] > 0]
    seg_starts = np.zeros(len(order) + 1, dtype=np.int64)
    np.cumsum(lengths[order] + 2, out=seg_starts[1:])
    return EpochLayout(seq_len, order, seg_starts)


_aranges = [np.arange(1 << 16, dtype=np.int64)]


def _arange(n: int) -> np.ndarray:
    """np.arange(n) from a cache (a batch needs one; allocating it each time costs as much as using it)."""
    if len(_aranges[0]) < n:
        _aranges[0] = np.arange(max(n, 2 * len(_aranges[0])), dtype=np.int64)
    return _aranges[0][:n]


@functools.lru_cache(maxsize=64)
def _token_bytes(token: int) -> bytes:
    return np.array([token], dtype=TOKEN_DTYPE).tobytes()


def _run_length(rows: np.ndarray) -> int:
    """The longest R such that `rows` is runs of R consecutive row numbers (1 when nothing better)."""
    n = len(rows)
    if n <= 1:
        return n
    step_ok = rows[1:] - rows[:-1] == 1
    if step_ok.all():
        return n
    breaks = np.flatnonzero(~step_ok) + 1
    run = int(breaks[0])
    if n % run == 0 and np.array_equal(breaks, np.arange(run, n, run)):
        return run
    return 1


def _shard_views(src: TokenSource) -> list[memoryview]:
    views = getattr(src, "_memoryviews", None)
    if views is None:
        views = [memoryview(np.ascontiguousarray(s, dtype=TOKEN_DTYPE)) for s in src.shards]
        try:
            object.__setattr__(src, "_memoryviews", views)
        except AttributeError:
            pass
    return views


def _verify_before_reading(src: TokenSource, shards) -> None:
    """A token store checks each shard the first time this process reads it (trainer/data/store.py)."""
    verify = getattr(src, "verify_shards", None)
    if verify is not None:
        verify(shards)


def _content_views(src: TokenSource, g_lo: np.ndarray, g_hi: np.ndarray) -> list[memoryview]:
    """Views of global token ranges [g_lo[i], g_hi[i]) (each inside one shard), as memoryviews.

    The pieces are joined with b"".join: per piece it costs a fraction of np.concatenate's overhead, which
    dominates for documents of a few hundred tokens."""
    views = _shard_views(src)
    if len(views) == 1:
        _verify_before_reading(src, (0,))
        shard = views[0]
        return [shard[x:y] for x, y in zip(g_lo.tolist(), g_hi.tolist())]
    # an empty range may sit at the very end of the tokens: clip it into the last shard (it slices to nothing)
    j = np.minimum(np.searchsorted(src.shard_starts, g_lo, side="right") - 1, len(views) - 1)
    _verify_before_reading(src, j)
    base = src.shard_starts[j]
    return [views[s][x:y] for s, x, y in zip(j.tolist(), (g_lo - base).tolist(), (g_hi - base).tolist())]


def _pack_run(src: TokenSource, layout: EpochLayout, first_row: int, B: int, bos_id: int, eos_id: int,
              out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`pack_rows` for B consecutive rows that end inside the stream (no padding): the loader's usual batch.

    Same result as the general path with far fewer array operations (their fixed cost dominates a batch): the
    window [a, stop) meets segments k0..k1-1 and only the first can start before it, only the last end after it.
    """
    S = layout.seq_len
    seg = layout.seg_starts
    n_out = B * S
    a = first_row * S
    stop = a + n_out + 1  # the window holds one token more than the rows, for the last label
    k0 = int(seg.searchsorted(a, side="right")) - 1
    k1 = int(seg.searchsorted(stop - 1, side="right"))  # one past the last segment touched
    s_all = seg[k0:k1 + 1]
    s0 = s_all[:-1]
    seg_len = s_all[1:] - s0  # document + BOS + EOS
    doc_start = src.doc_offsets[layout.order[k0:k1]]
    starts, lens = doc_start.tolist(), seg_len.tolist()
    n = len(lens)
    bos, eos = _token_bytes(bos_id), _token_bytes(eos_id)
    parts = [bos, None, eos] * n
    views = _shard_views(src)
    if len(views) == 1:
        _verify_before_reading(src, (0,))
        mv = views[0]
        parts[1::3] = [mv[x:x + m - 2] for x, m in zip(starts, lens)]
        shard_of = [0] * n
        base = [0] * n
    else:
        j = np.searchsorted(src.shard_starts, doc_start, side="right") - 1
        _verify_before_reading(src, j)
        shard_of, base = j.tolist(), src.shard_starts[j].tolist()
        parts[1::3] = [views[sh][x - b:x - b + m - 2] for sh, b, x, m in zip(shard_of, base, starts, lens)]
    for i in {0, n - 1}:  # the end pieces may be cut by the window (segment offsets: 0 BOS, 1..len, len+1 EOS)
        s_i, m, x = int(s_all[i]), lens[i], starts[i] - base[i]
        o_lo, o_hi = max(a - s_i, 0), min(stop - s_i, m)
        c_lo = max(o_lo, 1) - 1
        c_hi = max(min(o_hi, m - 1) - 1, c_lo)
        parts[3 * i] = bos if o_lo == 0 else b""
        parts[3 * i + 1] = views[shard_of[i]][x + c_lo:x + c_hi]
        parts[3 * i + 2] = eos if o_hi == m else b""
    stream = np.frombuffer(b"".join(parts), dtype=TOKEN_DTYPE)
    assert len(stream) == n_out + 1
    inputs, labels = out["input_ids"], out["labels"]
    np.copyto(inputs.reshape(-1), stream[:-1], casting="safe")
    np.copyto(labels.reshape(-1), stream[1:], casting="safe")
    # position = stream position - start of its segment; seg_len becomes each piece's length among the outputs
    seg_len[0] -= a - int(s_all[0])
    seg_len[-1] = n_out - (int(s_all[-2]) - a if n > 1 else 0)
    positions = np.repeat(a - s0, seg_len)
    positions += _arange(n_out)
    if "position_ids" in out:
        out["position_ids"][...] = positions.reshape(B, S)
    else:
        out["position_ids"] = positions.reshape(B, S)
    # the token before each BOS inside the window (at t >= 1) is not scored; s0[0] <= a, so only s0[1:]
    labels.reshape(-1)[s0[1:] - (a + 1)] = IGNORE_INDEX
    return out


def pack_rows(source, layout: EpochLayout, rows: np.ndarray | Sequence[int], *, bos_id: int, eos_id: int,
              pad_id: int, out: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Rows `rows` (row numbers of this epoch; numbers >= layout.num_rows give all-padding rows) as int64 arrays
    `input_ids`, `labels`, `position_ids` of shape [len(rows), seq_len], written into `out` when given.

    Runs of consecutive row numbers are read as one window of the stream (R rows: R*S + 1 tokens, the extra one
    for the last label), so a batch of consecutive rows costs one pass over its tokens.
    """
    src = token_source(source)
    S = layout.seq_len
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    B = len(rows)
    if out is None:
        out = {k: np.empty((B, S), dtype=np.int64) for k in ("input_ids", "labels")}
    inputs, labels = out["input_ids"], out["labels"]
    assert all(x.shape == (B, S) and x.dtype == np.int64 and x.flags.c_contiguous for x in (inputs, labels))
    if B == 0:
        out.setdefault("position_ids", np.empty((0, S), dtype=np.int64))
        return out
    seg = layout.seg_starts
    L = int(seg[-1])
    R = _run_length(rows)
    if R == B and (int(rows[0]) + B) * S < L:
        return _pack_run(src, layout, int(rows[0]), B, bos_id, eos_id, out)
    W = B // R
    win = R * S + 1  # window length in the stream
    a = rows[::R] * S  # window starts

    # Pieces: (window, segment) pairs where a window [a, a + win) meets a segment [seg[k], seg[k + 1]).
    end = np.maximum(np.minimum(a + win, L), a)
    k_first = np.searchsorted(seg, a, side="right") - 1
    k_last = np.searchsorted(seg, end - 1, side="right") - 1
    counts = np.where(end > a, k_last - k_first + 1, 0)
    first_piece = np.cumsum(counts) - counts
    n_pieces = int(counts.sum())
    piece_win = np.repeat(np.arange(W), counts)
    k = np.repeat(k_first - first_piece, counts) + np.arange(n_pieces)
    s0 = seg[k]
    s1 = seg[k + 1]
    a_p = a[piece_win]
    lo = np.maximum(s0, a_p)
    hi = np.minimum(s1, end[piece_win])
    o_lo = lo - s0  # offsets in the segment: 0 is the BOS, 1..len the tokens, len + 1 the EOS
    length = s1 - s0 - 2
    has_bos = o_lo == 0
    has_eos = hi - s0 == length + 2
    doc_start = src.doc_offsets[layout.order[k]]
    g_lo = doc_start + np.maximum(o_lo, 1) - 1
    g_hi = doc_start + np.minimum(hi - s0, length + 1) - 1

    # Tokens: one join of views into the shards, the BOS / EOS bytes around them.
    content = _content_views(src, g_lo, g_hi)
    choice = np.empty(2, dtype=object)
    choice[:] = [b"", _token_bytes(bos_id)]
    token_parts = np.empty(3 * n_pieces, dtype=object)
    token_parts[0::3] = choice[has_bos.view(np.int8)]
    token_parts[1::3] = content
    choice[1] = _token_bytes(eos_id)
    token_parts[2::3] = choice[has_eos.view(np.int8)]
    token_parts = token_parts.tolist()

    # Positions: o_lo, o_lo + 1, ... along each piece; padding counts 0, 1, ... from its start and each row start.
    # Computed straight in output coordinates, where each window contributes R*S entries (not its extra token).
    t_lo = lo - a_p  # where each piece starts in its window
    out_at = piece_win * (win - 1) + t_lo
    out_len = np.minimum(hi - a_p, win - 1) - t_lo
    pos_delta = o_lo - out_at
    pad_len = a + win - end
    pad_wins = np.flatnonzero(pad_len)
    if len(pad_wins):
        for w in reversed(pad_wins.tolist()):
            token_parts.insert(3 * int(first_piece[w] + counts[w]), _token_bytes(pad_id) * int(pad_len[w]))
        first_pad = (end - a)[pad_wins]
        pad_at = pad_wins * (win - 1) + first_pad
        place = np.searchsorted(out_at, pad_at)
        out_at = np.insert(out_at, place, pad_at)
        pos_delta = np.insert(pos_delta, place, -pad_at)
        out_len = np.insert(out_len, place, np.maximum(win - 1 - first_pad, 0))
    stream = np.frombuffer(b"".join(token_parts), dtype=TOKEN_DTYPE)
    assert len(stream) == W * win
    positions_flat = np.repeat(pos_delta, np.maximum(out_len, 0))
    positions_flat += _arange(B * S)
    for w in pad_wins.tolist():  # padding restarts at 0 in every row, so all-padding rows look alike
        first = int(end[w] - a[w])
        t = np.arange(first, win - 1)
        positions_flat[w * (win - 1) + first:(w + 1) * (win - 1)] = t - np.maximum(first, t // S * S)
    if "position_ids" in out:
        assert out["position_ids"].shape == (B, S) and out["position_ids"].dtype == np.int64
        out["position_ids"][...] = positions_flat.reshape(B, S)
    else:
        out["position_ids"] = positions_flat.reshape(B, S)

    windows = stream.reshape(W, win)
    np.copyto(inputs.reshape(W, R * S), windows[:, :-1], casting="safe")
    np.copyto(labels.reshape(W, R * S), windows[:, 1:], casting="safe")

    # Not scored: a label that is the BOS of another document (the token before a BOS at window offset t >= 1),
    # and everything from the token before padding on.
    flat_labels = labels.reshape(-1)
    inner = has_bos & (t_lo > 0)
    flat_labels[piece_win[inner] * (win - 1) + t_lo[inner] - 1] = IGNORE_INDEX
    for w in pad_wins.tolist():
        first_pad = int(end[w] - a[w])
        flat_labels[w * (win - 1) + max(first_pad - 1, 0):(w + 1) * (win - 1)] = IGNORE_INDEX
    return out


def pack_range(source, layout: EpochLayout, start: int, count: int, *, bos_id: int, eos_id: int,
               pad_id: int) -> dict[str, np.ndarray]:
    """`pack_rows` of rows start, start + 1, ..., start + count - 1 (a batch of consecutive rows)."""
    if count > 0 and (start + count) * layout.seq_len < layout.stream_len:
        out = {k: np.empty((count, layout.seq_len), dtype=np.int64) for k in ("input_ids", "labels")}
        return _pack_run(token_source(source), layout, start, count, bos_id, eos_id, out)
    return pack_rows(source, layout, np.arange(start, start + count), bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)


def pack_documents(documents, seq_len: int, *, bos_id: int, eos_id: int, pad_id: int,
                   order: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """All rows of one epoch of `documents` (a TokenStore or a list of token arrays) in `order` (default: as given).

    Returns int64 arrays `input_ids`, `labels`, `position_ids`, each [rows, seq_len].
    """
    src = token_source(documents)
    layout = epoch_layout(np.diff(src.doc_offsets), seq_len, order)
    return pack_rows(src, layout, np.arange(layout.num_rows), bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)


def pack_documents_ref(documents: Sequence[np.ndarray], seq_len: int, *, bos_id: int, eos_id: int, pad_id: int,
                       order: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """Reference for `pack_documents`: the whole stream spelled out token by token, then cut into rows."""
    order = range(len(documents)) if order is None else order
    stream: list[int] = []
    pos: list[int] = []
    starts: list[bool] = []  # the token is a BOS (or the first padding token): nothing predicts it
    for i in order:
        doc = [int(t) for t in documents[i]]
        if not doc:
            continue
        seg = [bos_id] + doc + [eos_id]
        stream += seg
        pos += list(range(len(seg)))
        starts += [True] + [False] * (len(seg) - 1)
    n_rows = -(-len(stream) // seq_len)
    n_pad = n_rows * seq_len - len(stream)
    real = len(stream)
    stream += [pad_id] * n_pad
    pos += list(range(n_pad))
    starts += [True] * n_pad
    inputs = np.array(stream, dtype=np.int64).reshape(n_rows, seq_len)
    labels = np.full(n_rows * seq_len, IGNORE_INDEX, dtype=np.int64)
    for t in range(n_rows * seq_len):
        if t + 1 < real and not starts[t + 1]:
            labels[t] = stream[t + 1]
    return {"input_ids": inputs, "labels": labels.reshape(n_rows, seq_len),
            "position_ids": np.array(pos, dtype=np.int64).reshape(n_rows, seq_len)}
