"""The loader: an epoch split over ranks, exact resume, mixtures, finite epochs, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import write_token_store
from tests.test_data_packing import BOS, EOS, PAD, check_epoch, random_documents
from trainer.data.loader import PackedLoader, mixture_period
from trainer.data.store import TokenStore
from trainer.errors import UserError

HASH = "ab" * 32


def make_store(path, docs, *, tokenizer_hash=HASH):
    return TokenStore(write_token_store(path, docs, vocab_size=4000, bos_id=BOS, eos_id=EOS, pad_id=PAD,
                                        tokenizer_sha256=tokenizer_hash, shard_tokens=700))


def distinct_documents(docs: list[np.ndarray], rng) -> list[np.ndarray]:
    """`docs` with every non-empty document made unique (a token appended where one repeats an earlier one):
    _infer_order identifies documents by their content, and short random documents can coincide."""
    seen, out = set(), []
    for doc in docs:
        while len(doc) and doc.tobytes() in seen:
            doc = np.append(doc, rng.integers(10, 1000)).astype(np.uint32)
        seen.add(doc.tobytes())
        out.append(doc)
    return out


@pytest.fixture
def store(tmp_path, seed):
    rng = np.random.default_rng(seed)
    docs = distinct_documents(random_documents(rng, 120, max_len=50, vocab=(10, 1000)), rng)
    return make_store(tmp_path / "store", docs)


def _stack(batches):
    return {k: torch.cat([b[k] for b in batches]).numpy() for k in ("input_ids", "labels", "position_ids")}


def _global_rows(per_rank: list[list[dict]]) -> dict:
    """Rows in global order: global batch n is rank 0's batch n, then rank 1's, ..."""
    steps = len(per_rank[0])
    assert all(len(r) == steps for r in per_rank)  # every rank yields as many batches
    return _stack([per_rank[r][n] for n in range(steps) for r in range(len(per_rank))])


def _infer_order(rows, store):
    """Which document each BOS segment of the rows is (documents are distinct random sequences)."""
    index = {store.document(i).tobytes(): i for i in range(store.num_documents)}
    ids, pos = rows["input_ids"].reshape(-1), rows["position_ids"].reshape(-1)
    starts = np.flatnonzero((pos == 0) & (ids == BOS))
    order = []
    for x in starts.tolist():
        y = x + 1 + int(np.argmax(ids[x + 1:] == EOS))
        order.append(index[ids[x + 1:y].astype(np.uint32).tobytes()])
    return order


@pytest.mark.parametrize("world_size, workers, shuffle", [(1, 0, "documents"), (2, 0, "windows"),
                                                          (2, 2, "documents"), (3, 1, "none")])
def test_ranks_split_an_epoch_exactly(store, world_size, workers, shuffle):
    per_rank = [list(PackedLoader(store, seq_len=37, batch_size=3, seed=5, rank=r, world_size=world_size,
                                  num_workers=workers, shuffle=shuffle, epochs=1)) for r in range(world_size)]
    rows = _global_rows(per_rank)
    n_rows = PackedLoader(store, seq_len=37, batch_size=3).rows_per_epoch[0]
    extra = len(rows["input_ids"]) - n_rows
    assert 0 <= extra < 3 * world_size  # only the last global batch is completed with padding rows
    assert np.all(rows["labels"][n_rows:] == -100) and np.all(rows["input_ids"][n_rows:] == PAD)
    epoch = {k: v[:n_rows] for k, v in rows.items()}
    if shuffle == "windows":  # fixed windows in shuffled order: put them back in stream order first
        first = epoch["position_ids"][:, 0]
        assert not np.all(np.diff(first) >= 0) or n_rows < 3
        return _check_windows(epoch, store)
    order = _infer_order(epoch, store)
    docs = [store.document(i) for i in range(store.num_documents)]
    check_epoch(epoch, docs, order, 37)  # every token of every document exactly once, in order; the rules hold
    assert sorted(order) == [i for i in range(store.num_documents) if len(docs[i])]
    assert (order == sorted(order)) == (shuffle == "none")


def _check_windows(epoch, store):
    # Each row is a window of one shuffled stream: every document token still appears exactly once overall.
    ids = epoch["input_ids"]
    content = ids[(ids != BOS) & (ids != EOS) & (ids != PAD)]
    expected = np.concatenate([store.document(i) for i in range(store.num_documents)])
    assert np.array_equal(np.sort(content), np.sort(expected.astype(np.int64)))
    assert np.count_nonzero(ids == BOS) == sum(1 for i in range(store.num_documents) if len(store.document(i)))


@pytest.mark.parametrize("world_size, workers", [(1, 1), (1, 2), (2, 1), (2, 2)])
def test_resume_yields_the_uninterrupted_batches(store, seed, world_size, workers):
    steps = 2 * -(-PackedLoader(store, seq_len=29, batch_size=4).rows_per_epoch[0] // (4 * world_size)) // 3 + 7
    split = np.random.default_rng(seed).integers(1, steps)
    for rank in range(world_size):
        def loader():
            return PackedLoader(store, seq_len=29, batch_size=4, seed=11, rank=rank, world_size=world_size,
                                num_workers=workers)

        whole = [b for _, b in zip(range(steps), loader())]
        first = loader()
        head = [b for _, b in zip(range(split), first)]
        state = first.state_dict()
        resumed = loader()
        resumed.load_state_dict(state)
        tail = [b for _, b in zip(range(steps - split), resumed)]
        assert len(head) + len(tail) == steps
        for a, b in zip(whole, head + tail):
            assert all(torch.equal(a[k], b[k]) for k in a)
        in_process = PackedLoader(store, seq_len=29, batch_size=4, seed=11, rank=rank, world_size=world_size)
        for a, b in zip(whole, in_process):  # the number of loader workers never changes the batches
            assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_another_world_size_continues_the_row_stream(store):
    g = [list(zip(range(6), PackedLoader(store, seq_len=16, batch_size=2, seed=3, rank=r, world_size=2)))
         for r in range(2)]
    two_ranks = _global_rows([[b for _, b in g[0][:4]], [b for _, b in g[1][:4]]])
    old = PackedLoader(store, seq_len=16, batch_size=2, seed=3, rank=0, world_size=2)
    for _, _b in zip(range(4), old):
        pass
    state = old.state_dict()
    new = PackedLoader(store, seq_len=16, batch_size=4, seed=3, rank=0, world_size=1)
    new.load_state_dict(state)
    after = _stack([b for _, b in zip(range(2), new)])
    one_rank = _stack([b for _, b in zip(range(6), PackedLoader(store, seq_len=16, batch_size=4, seed=3))])
    joined = {k: np.concatenate([two_ranks[k], after[k]]) for k in after}
    assert all(np.array_equal(joined[k], one_rank[k]) for k in joined)


def test_mixture_by_weight(tmp_path, seed):
    rng = np.random.default_rng(seed)

    def filling_rows(docs, vocab):  # no padded row, so every row holds a token that tells its store
        stream = sum(len(d) + 2 for d in docs if len(d))
        return docs + [rng.integers(*vocab, size=(-stream - 2) % 20 or 20).astype(np.uint32)]

    new = make_store(tmp_path / "new", filling_rows(random_documents(rng, 80, max_len=40, vocab=(10, 1000)),
                                                    (10, 1000)))
    old = make_store(tmp_path / "old", filling_rows(random_documents(rng, 12, max_len=20, vocab=(2000, 3000)),
                                                    (2000, 3000)))
    loader = PackedLoader([new, old], weights=[0.75, 0.25], seq_len=20, batch_size=4, seed=9)
    r_old = loader.rows_per_epoch[1]
    steps = 3 * r_old + 2
    batches = [b for _, b in zip(range(steps), loader)]
    rows = _stack(batches)
    is_old = (rows["input_ids"] >= 2000).any(axis=1)
    is_new = ((rows["input_ids"] >= 10) & (rows["input_ids"] < 1000)).any(axis=1)
    assert not np.any(is_old & is_new) and np.all(is_old | is_new)  # a row comes from one store
    assert np.all(is_old.reshape(steps, 4).sum(axis=1) == 1)  # exactly 1 replay row in every batch of 4
    # The replay store's rows form whole epochs of its own, each a fresh shuffle.
    old_rows = {k: v[is_old] for k, v in rows.items()}
    docs = [old.document(i) for i in range(old.num_documents)]
    orders = []
    for e in range(3):
        epoch = {k: v[e * r_old:(e + 1) * r_old] for k, v in old_rows.items()}
        orders.append(_infer_order(epoch, old))
        check_epoch(epoch, docs, orders[-1], 20)
    assert orders[0] != orders[1] or orders[1] != orders[2]
    store_of_slot, _ = mixture_period([0.95, 0.05])
    assert len(store_of_slot) == 20 and store_of_slot.sum() == 1


def test_finite_epochs_give_every_rank_the_same_batches_count(store):
    loaders = [PackedLoader(store, seq_len=50, batch_size=5, rank=r, world_size=2, epochs=2) for r in range(2)]
    counts = [len(list(ld)) for ld in loaders]
    assert counts[0] == counts[1] == len(loaders[0]) == -(-2 * loaders[0].rows_per_epoch[0] // 10)
    assert loaders[0].epoch == 2 and list(loaders[0]) == []  # exhausted
    with pytest.raises(TypeError):
        len(PackedLoader(store, seq_len=50, batch_size=5))


def test_determinism_and_state_checks(store, tmp_path):
    def first(seed, **kw):
        return next(iter(PackedLoader(store, seq_len=64, batch_size=2, seed=seed, **kw)))["input_ids"]

    assert torch.equal(first(1), first(1)) and not torch.equal(first(1), first(2))
    a = PackedLoader(store, seq_len=64, batch_size=2, seed=1)
    b = PackedLoader(store, seq_len=64, batch_size=2, seed=2)
    with pytest.raises(UserError, match="other seed"):
        b.load_state_dict(a.state_dict())
    with pytest.raises(UserError, match="other seq_len"):
        PackedLoader(store, seq_len=65, batch_size=2, seed=1).load_state_dict(a.state_dict())
    other = make_store(tmp_path / "other", [np.arange(10, 20, dtype=np.uint32)])
    with pytest.raises(UserError, match="other token stores"):
        PackedLoader(other, seq_len=64, batch_size=2, seed=1).load_state_dict(a.state_dict())
    with pytest.raises(UserError, match="another tokenizer"):
        PackedLoader(store.path, seq_len=64, batch_size=2, tokenizer_hash="cd" * 32)
    mixed = make_store(tmp_path / "mixed", [np.arange(10, 20, dtype=np.uint32)], tokenizer_hash="ef" * 32)
    with pytest.raises(UserError, match="different tokenizers"):
        PackedLoader([store, mixed], seq_len=64, batch_size=2)


def test_rank_and_world_size_default_to_torch_distributed(store, monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    loader = PackedLoader(store, seq_len=32, batch_size=2, seed=4)
    assert (loader.rank, loader.world_size, loader.global_batch_size) == (1, 2, 4)
    want = PackedLoader(store, seq_len=32, batch_size=2, seed=4, rank=1, world_size=2)
    assert torch.equal(next(iter(loader))["input_ids"], next(iter(want))["input_ids"])


@pytest.mark.parametrize("workers", [0, 1])
def test_a_shard_changed_after_tokenizing_stops_the_loader_with_one_clear_error(tmp_path, seed, workers):
    rng = np.random.default_rng(seed)
    docs = distinct_documents(random_documents(rng, 60, max_len=50, vocab=(10, 1000)), rng)
    store = make_store(tmp_path / "store", docs).path
    shard = store / "tokens-00001.u32"
    data = bytearray(shard.read_bytes())
    data[int(rng.integers(len(data)))] ^= 0x10  # same size, other bytes: only the hash can tell
    shard.write_bytes(bytes(data))
    loader = PackedLoader(store, seq_len=37, batch_size=3, num_workers=workers, epochs=1)
    with pytest.raises(UserError, match=r"tokens-00001.u32: content does not match its sha256") as caught:
        list(loader)  # the whole epoch: the changed shard is read at some batch
    assert "Traceback" not in str(caught.value) and "\n" not in str(caught.value)
