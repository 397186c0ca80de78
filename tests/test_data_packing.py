"""Packing: against the token-by-token reference, and the epoch rules checked directly on the rows."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.data.packing import (IGNORE_INDEX, epoch_layout, pack_documents, pack_documents_ref, pack_rows,
                                  token_source)

BOS, EOS, PAD = 2, 1, 0
IDS = dict(bos_id=BOS, eos_id=EOS, pad_id=PAD)


def check_epoch(rows: dict, documents: list, order, seq_len: int, *, bos=BOS, eos=EOS, pad=PAD) -> None:
    """The packing contract, on every row of one epoch (rows in order)."""
    ids, labels, pos = (np.asarray(rows[k]) for k in ("input_ids", "labels", "position_ids"))
    assert ids.shape == labels.shape == pos.shape and ids.shape[1] == seq_len
    assert ids.dtype == labels.dtype == pos.dtype == np.int64
    flat_ids, flat_pos, flat_labels = ids.reshape(-1), pos.reshape(-1), labels.reshape(-1)
    n = len(flat_ids)
    # Segments start where position_ids is 0: documents start with BOS; the rest is padding at the end.
    starts = np.flatnonzero(flat_pos == 0)
    bounds = list(zip(starts.tolist(), starts[1:].tolist() + [n]))
    expected = [np.asarray(documents[i]) for i in order if len(documents[i])]
    doc_segments = [(x, y) for x, y in bounds if flat_ids[x] == bos]
    assert len(doc_segments) == len(expected)
    for (x, y), doc in zip(doc_segments, expected):
        assert y - x == len(doc) + 2 and flat_ids[y - 1] == eos  # BOS, every token in order, EOS
        assert np.array_equal(flat_ids[x + 1:y - 1], doc)
        assert np.array_equal(flat_pos[x:y], np.arange(y - x))  # positions continue across rows
    real = doc_segments[-1][1] if doc_segments else 0
    assert real > n - seq_len  # only the last row is padded ...
    assert np.all(flat_ids[real:] == pad) and np.all(flat_labels[real - 1:] == IGNORE_INDEX)
    pad_pos = flat_pos[real:]
    if len(pad_pos):  # ... and its positions restart at 0 after the last EOS (a segment of their own)
        assert np.array_equal(pad_pos, np.arange(real, n) - real)
    # Labels: the next token of the same document; never across a boundary.
    nxt = np.append(flat_ids[1:], pad)
    same_doc = np.append(flat_pos[1:] == flat_pos[:-1] + 1, False)
    same_doc[real - 1:] = False
    assert np.array_equal(flat_labels, np.where(same_doc, nxt, IGNORE_INDEX))
    assert np.all(flat_labels[flat_ids == eos] == IGNORE_INDEX)  # an EOS never predicts the next BOS


def random_documents(rng, n, *, long_every=5, max_len=60, vocab=(3, 300)):
    docs = []
    for i in range(n):
        if i % 7 == 3:
            length = 0
        elif i % long_every == 0:
            length = int(rng.integers(max_len, 12 * max_len))
        else:
            length = int(rng.integers(1, max_len + 1))
        docs.append(rng.integers(*vocab, size=length).astype(np.uint32))
    return docs


def test_matches_reference(seed):
    rng = np.random.default_rng(seed)
    for _ in range(40):
        docs = random_documents(rng, int(rng.integers(0, 12)), max_len=int(rng.integers(1, 30)))  # 1: one-token documents
        seq_len = int(rng.integers(1, 40))
        order = rng.permutation(len(docs))
        got = pack_documents(docs, seq_len, order=order, **IDS)
        ref = pack_documents_ref(docs, seq_len, order=order, **IDS)
        for k in ref:
            assert np.array_equal(got[k], ref[k]), (k, seq_len)
        if len(ref["input_ids"]):
            check_epoch(got, docs, order, seq_len)


@pytest.mark.parametrize("seq_len", [1, 2, 7, 64])
def test_edge_cases(seq_len):
    docs = [np.array([], np.uint32), np.arange(3, 3 + 11 * seq_len + 5, dtype=np.uint32),  # > ten rows
            np.array([7], np.uint32), np.array([], np.uint32),
            np.arange(5, 5 + max(seq_len - 2, 1), dtype=np.uint32)]  # exactly one row with BOS and EOS
    order = [4, 1, 0, 2, 3]
    rows = pack_documents(docs, seq_len, order=order, **IDS)
    check_epoch(rows, docs, order, seq_len)
    long_rows = np.flatnonzero((rows["input_ids"] >= 3).any(axis=1) & (rows["position_ids"][:, 0] > 0))
    assert len(long_rows) >= 10  # the long document continues over ten rows, positions counting on


def test_shared_text_store(tmp_path, shared_data, seed):
    from trainer.data.store import TokenStore
    from trainer.data.tokenize import tokenize_to_store

    tokenize_to_store([shared_data / "text" / "en_ewt.txt", shared_data / "text" / "lt_news.txt"],
                      tokenizer=shared_data / "tokenizers" / "botchan_en_unigram_1000.model", out=tmp_path / "s")
    store = TokenStore(tmp_path / "s")
    docs = [store.document(i) for i in range(store.num_documents)]
    rng = np.random.default_rng(seed)
    for seq_len in (int(rng.integers(50, 300)), 2048):
        order = rng.permutation(store.num_documents)
        ids = dict(bos_id=store.bos_id, eos_id=store.eos_id, pad_id=store.pad_id)
        rows = pack_documents(store, seq_len, order=order, **ids)
        check_epoch(rows, docs, order, seq_len, bos=store.bos_id, eos=store.eos_id, pad=store.pad_id)
        assert rows["input_ids"].max() < store.vocab_size


def test_any_rows_equal_the_epoch_rows(seed):
    rng = np.random.default_rng(seed)
    docs = random_documents(rng, 50, max_len=40)
    seq_len = int(rng.integers(5, 50))
    src = token_source(docs)
    layout = epoch_layout(np.diff(src.doc_offsets), seq_len, rng.permutation(len(docs)))
    epoch = pack_rows(src, layout, np.arange(layout.num_rows), **IDS)
    n = layout.num_rows
    beyond = {"input_ids": np.full((3, seq_len), PAD), "labels": np.full((3, seq_len), IGNORE_INDEX),
              "position_ids": np.tile(np.arange(seq_len), (3, 1))}
    full = {k: np.concatenate([epoch[k], beyond[k]]) for k in epoch}
    picks = [rng.integers(0, n + 3, size=9),  # scattered (the windows shuffle)
             np.arange(n - 4, n + 2),  # across the end of the epoch
             (np.arange(3)[:, None] * 11 + np.arange(4)).ravel() % (n + 3),  # runs of 4 (several batches)
             np.arange(int(rng.integers(0, n - 3)), n - 1)]  # one long run
    for rows in picks:
        got = pack_rows(src, layout, rows, **IDS)
        for k in epoch:
            assert np.array_equal(got[k], full[k][rows]), (k, rows)


def test_multi_shard_source_matches_single(seed):
    rng = np.random.default_rng(seed)
    docs = random_documents(rng, 30, max_len=30)
    single = token_source(docs)
    cut = int(single.doc_offsets[len(docs) // 2])
    flat = single.shards[0]
    from trainer.data.packing import TokenSource

    split = TokenSource([flat[:cut].copy(), flat[cut:].copy()], np.array([0, cut, len(flat)]), single.doc_offsets)
    for seq_len in (1, 13):  # seq_len 1: a window starts at every position, the store's last EOS included
        layout = epoch_layout(np.diff(single.doc_offsets), seq_len, rng.permutation(len(docs)))
        n = layout.num_rows
        every_other = np.stack([np.arange(n), (np.arange(n) + 2) % n], axis=1).ravel()  # one window per row
        for r in (rng.integers(0, n, size=10), np.arange(n), np.arange(1, n - 1), every_other):
            a = pack_rows(single, layout, r, **IDS)
            b = pack_rows(split, layout, r, **IDS)
            assert all(np.array_equal(a[k], b[k]) for k in a)
