"""The resumable, sharded, mixable loader of packed rows.

    loader = PackedLoader(["lt_store", "en_replay_store"], weights=[0.95, 0.05], seq_len=2048, batch_size=8,
                          seed=0, rank=rank, world_size=world_size, num_workers=2)
    for step, batch in zip(range(steps), loader):      # endless unless epochs=N; one batch per optimizer micro-step
        batch["input_ids"], batch["labels"], batch["position_ids"]   # torch int64 [batch_size, seq_len]
    checkpoint["loader"] = loader.state_dict()          # ... later: loader.load_state_dict(checkpoint["loader"])

How rows are chosen (everything below is a pure function of the seed, the stores, the weights and the position):

- Each store has its own epochs. Epoch e of store s is its non-empty documents in an order drawn from
  (seed, s, e) (`shuffle="documents"`, the default), packed into rows (see packing.py); `shuffle="windows"` also
  permutes those fixed rows; `shuffle="none"` keeps store order (evaluation). A store's row stream is its epochs
  one after another, so no row is lost at an epoch boundary.
- The global row stream interleaves the stores by weight: slot i of a fixed period of P slots goes to the store
  that a smooth weighted round robin picks, so any P consecutive slots hold exactly P*w_s rows of store s
  (weights are fractions of rows, i.e. of tokens; they are taken as fractions with denominators up to 1000).
- Global batch n is the next batch_size * world_size slots; rank r takes its contiguous batch_size of them. Ranks
  are disjoint and equal in size; with loader workers, worker w builds batches w, w + W, ... and they are
  delivered in order, so the batches never depend on the number of workers or on timing.
- `state_dict()` is the number of global rows consumed (plus what identifies the data); a loader restored from it
  yields exactly the batches the uninterrupted one would have. Because the position is counted in rows of the
  global stream, a run may even resume with another world size or batch size: it continues with the next row.
- `epochs=N` ends the stream after store 0 (the first) has been read N times; the last global batch is completed
  with all-padding rows (labels -100) so every rank yields the same number of batches. Without `epochs`, the
  loader never ends.
"""

from __future__ import annotations

import collections
import math
import os
from fractions import Fraction
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist

from trainer.data.packing import BATCH_KEYS, IGNORE_INDEX, EpochLayout, epoch_layout, pack_range, pack_rows
from trainer.data.store import TokenStore
from trainer.errors import UserError

STATE_FORMAT = "gemma-ewc/loader-v1"
SHUFFLES = ("documents", "windows", "none")


def mixture_period(weights: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """The fixed interleaving of stores: (store of each slot, rank of the slot among its store's) over one period.

    Weights become fractions (denominator <= 1000); the period P is the least common denominator, so P
    consecutive slots hold exactly P * w_s slots of store s, spread evenly (smooth weighted round robin).
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise UserError(f"mixture weights must be positive numbers, got {list(weights)}")
    fractions = [Fraction(float(x)).limit_denominator(1000) for x in w / w.sum()]
    period = math.lcm(*(f.denominator for f in fractions))
    counts = [int(f * period) for f in fractions]
    if period > 100_000 or sum(counts) != period or min(counts) == 0:
        period = 10_000
        raw = w / w.sum() * period
        counts = np.floor(raw).astype(np.int64)
        counts[np.argsort(-(raw - counts), kind="stable")[:period - counts.sum()]] += 1
        counts = counts.tolist()
        if min(counts) == 0:
            raise UserError(f"a mixture weight is below 1/10000 of the total: {list(weights)}")
        g = math.gcd(*counts)
        counts = [c // g for c in counts]
        period //= g
    current = np.zeros(len(counts), dtype=np.int64)
    k = np.asarray(counts, dtype=np.int64)
    slot_store = np.empty(period, dtype=np.int64)
    for j in range(period):
        current += k
        s = int(np.argmax(current))
        current[s] -= period
        slot_store[j] = s
    slot_rank = np.empty(period, dtype=np.int64)
    for s in range(len(counts)):
        m = slot_store == s
        slot_rank[m] = np.arange(int(m.sum()))
    return slot_store, slot_rank


class _SlotPlan:
    """Everything that turns a global slot number into packed rows; shared by the loader and its workers."""

    def __init__(self, stores: list[TokenStore], weights: list[float], seq_len: int, seed: int, shuffle: str,
                 epochs: int | None):
        self.stores = stores
        self.seq_len = seq_len
        self.seed = seed
        self.shuffle = shuffle
        self.slot_store, self.slot_rank = mixture_period(weights)
        self.period = len(self.slot_store)
        self.per_period = np.bincount(self.slot_store, minlength=len(stores))
        self.rows_per_epoch = []
        for i, store in enumerate(stores):
            lengths = store.doc_lengths
            stream = int((lengths[lengths > 0] + 2).sum())
            if stream == 0:
                raise UserError(f"{store.path}: the token store holds no tokens (only empty documents)")
            self.rows_per_epoch.append(-(-stream // seq_len))
        ref = stores[0]
        self.bos_id, self.eos_id, self.pad_id = ref.bos_id, ref.eos_id, ref.pad_id
        self.total_slots = None if epochs is None else self._slot_of(0, epochs * self.rows_per_epoch[0] - 1) + 1
        self._layouts: dict[int, collections.OrderedDict] = {i: collections.OrderedDict() for i in range(len(stores))}

    def _slot_of(self, store: int, j: int) -> int:
        """The global slot of store `store`'s row j."""
        positions = np.flatnonzero(self.slot_store == store)
        q, r = divmod(j, int(self.per_period[store]))
        return q * self.period + int(positions[r])

    def locate(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(store, row number in that store's endless row stream) of each global slot."""
        q, r = np.divmod(slots, self.period)
        store = self.slot_store[r]
        return store, q * self.per_period[store] + self.slot_rank[r]

    def _rng(self, store: int, epoch: int, purpose: int) -> np.random.RandomState:
        # RandomState's stream is frozen across NumPy versions (Generator's is not): resumes stay exact.
        words = [self.seed & 0xFFFFFFFF, self.seed >> 32, store, epoch & 0xFFFFFFFF, epoch >> 32, purpose]
        return np.random.RandomState(np.array(words, dtype=np.uint32))

    def layout(self, store: int, epoch: int) -> tuple[EpochLayout, np.ndarray | None]:
        cache = self._layouts[store]
        if epoch in cache:
            cache.move_to_end(epoch)
            return cache[epoch]
        s = self.stores[store]
        order = None if self.shuffle == "none" else self._rng(store, epoch, 0).permutation(s.num_documents)
        layout = epoch_layout(s.doc_lengths, self.seq_len, order)
        assert layout.num_rows == self.rows_per_epoch[store]
        row_perm = self._rng(store, epoch, 1).permutation(layout.num_rows) if self.shuffle == "windows" else None
        cache[epoch] = (layout, row_perm)
        while len(cache) > 2:
            cache.popitem(last=False)
        return cache[epoch]

    def rows(self, first_slot: int, count: int) -> dict[str, np.ndarray]:
        """The packed rows of global slots [first_slot, first_slot + count), as int64 numpy arrays."""
        S = self.seq_len
        if len(self.stores) == 1 and (self.total_slots is None or first_slot + count <= self.total_slots):
            e0, q0 = divmod(first_slot, self.rows_per_epoch[0])
            layout, row_perm = self.layout(0, e0)
            if q0 + count <= self.rows_per_epoch[0] and row_perm is None:  # the usual batch: consecutive rows
                return pack_range(self.stores[0], layout, q0, count, bos_id=self.bos_id, eos_id=self.eos_id,
                                  pad_id=self.pad_id)
        slots = np.arange(first_slot, first_slot + count, dtype=np.int64)
        live = slots if self.total_slots is None else slots[slots < self.total_slots]
        store, j = self.locate(live)
        groups = []
        for s in np.unique(store).tolist():
            m = store == s
            epoch, q = np.divmod(j[m], self.rows_per_epoch[s])
            for e in np.unique(epoch).tolist():
                me = epoch == e
                groups.append((s, e, np.flatnonzero(m)[me], q[me]))
        if len(groups) == 1 and len(live) == count:
            s, e, _, q = groups[0]
            return self._pack(s, e, q)
        out = {k: np.empty((count, S), dtype=np.int64) for k in BATCH_KEYS}
        for s, e, where, q in groups:
            part = self._pack(s, e, q)
            for k in BATCH_KEYS:
                out[k][where] = part[k]
        if len(live) < count:  # past the end of a finite stream: all-padding rows
            out["input_ids"][len(live):] = self.pad_id
            out["labels"][len(live):] = IGNORE_INDEX
            out["position_ids"][len(live):] = np.arange(S)
        return out

    def _pack(self, store: int, epoch: int, q: np.ndarray) -> dict[str, np.ndarray]:
        layout, row_perm = self.layout(store, epoch)
        rows = q if row_perm is None else row_perm[q]
        return pack_rows(self.stores[store], layout, rows, bos_id=self.bos_id, eos_id=self.eos_id,
                         pad_id=self.pad_id)


def _to_torch(rows: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(rows[k]) for k in BATCH_KEYS}


_WORKER_ERROR = "user_error"  # key of the batch a loader worker sends in place of a UserError


class _Batches(torch.utils.data.IterableDataset):
    """Batches first_slot + n * global_batch (+ rank offset) for n in [0, count); worker w of W builds n = w mod W."""

    def __init__(self, plan: _SlotPlan, first_slot: int, count: int | None, global_batch: int, rank_offset: int,
                 batch_size: int):
        self.plan, self.first_slot, self.count = plan, first_slot, count
        self.global_batch, self.rank_offset, self.batch_size = global_batch, rank_offset, batch_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        n = worker
        while self.count is None or n < self.count:
            try:
                rows = self.plan.rows(self.first_slot + n * self.global_batch + self.rank_offset, self.batch_size)
            except UserError as exc:
                if info is None:
                    raise
                # A worker's exception reaches the trainer wrapped in its traceback; hand the message over instead.
                yield {_WORKER_ERROR: str(exc)}
                return
            yield _to_torch(rows)
            n += workers


def _open_store(store, tokenizer_hash: str | None) -> TokenStore:
    if isinstance(store, TokenStore):
        if tokenizer_hash is not None and store.tokenizer_hash != tokenizer_hash:
            TokenStore(store.path, expected_tokenizer_hash=tokenizer_hash)  # raises the standard error
        return store
    return TokenStore(store, expected_tokenizer_hash=tokenizer_hash)


class PackedLoader:
    """Endless (or `epochs`-long) iterable of packed batches for one data-parallel rank. See the module doc.

    stores: a TokenStore or path, or a list of them (a mixture, with `weights`, default equal).
    batch_size: rows per batch on this rank (the global batch is batch_size * world_size).
    rank, world_size: the data-parallel position (default: torch.distributed's, else 0 of 1).
    num_workers: loader processes (0: build batches in this process; packing is fast, see bench/data.py).
    tokenizer_hash: the sha256 of the tokenizer the model uses; a store made with another is an error.
    """

    def __init__(self, stores, *, seq_len: int, batch_size: int, weights: Sequence[float] | None = None,
                 seed: int = 0, rank: int | None = None, world_size: int | None = None, num_workers: int = 0,
                 shuffle: str = "documents", epochs: int | None = None, pin_memory: bool = False,
                 tokenizer_hash: str | None = None, prefetch_factor: int = 4):
        if isinstance(stores, (TokenStore, str, os.PathLike)):
            stores = [stores]
        stores = [_open_store(s, tokenizer_hash) for s in stores]
        if not stores:
            raise UserError("the loader needs at least one token store")
        hashes = {s.tokenizer_hash for s in stores}
        if len(hashes) > 1:
            raise UserError("the token stores were made with different tokenizers: "
                            + ", ".join(f"{s.path} ({s.tokenizer_hash[:12]}…)" for s in stores))
        weights = [1.0] * len(stores) if weights is None else [float(w) for w in weights]
        if len(weights) != len(stores):
            raise UserError(f"{len(weights)} mixture weights for {len(stores)} token stores")
        if seq_len < 1 or batch_size < 1:
            raise UserError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
        if shuffle not in SHUFFLES:
            raise UserError(f"shuffle must be one of {', '.join(SHUFFLES)}, got {shuffle!r}")
        if seed < 0 or seed >= 2**64:
            raise UserError(f"seed must be in [0, 2**64), got {seed}")
        if epochs is not None and epochs < 1:
            raise UserError(f"epochs must be at least 1, got {epochs}")
        if rank is None or world_size is None:
            initialized = dist.is_available() and dist.is_initialized()
            rank = (dist.get_rank() if initialized else 0) if rank is None else rank
            world_size = (dist.get_world_size() if initialized else 1) if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world size {world_size}")
        self.stores = stores
        self.weights = weights
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.num_workers, self.shuffle, self.epochs = num_workers, shuffle, epochs
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.plan = _SlotPlan(stores, weights, seq_len, seed, shuffle, epochs)
        self.rows_consumed = 0  # global rows (slots) handed out so far, by all ranks together

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    @property
    def pad_id(self) -> int:
        return self.plan.pad_id

    @property
    def rows_per_epoch(self) -> list[int]:
        """Rows in one epoch of each store."""
        return list(self.plan.rows_per_epoch)

    @property
    def epoch(self) -> int:
        """The epoch of store 0 that the next batch starts in (counting from 0)."""
        q, r = divmod(self.rows_consumed, self.plan.period)
        rows_of_store0 = q * int(self.plan.per_period[0]) + int(np.count_nonzero(self.plan.slot_store[:r] == 0))
        return rows_of_store0 // self.plan.rows_per_epoch[0]

    def __len__(self) -> int:
        """Batches in the whole stream (only with `epochs`)."""
        if self.plan.total_slots is None:
            raise TypeError("an endless PackedLoader has no length; pass epochs=N for a finite one")
        return -(-self.plan.total_slots // self.global_batch_size)

    def _remaining_batches(self) -> int | None:
        if self.plan.total_slots is None:
            return None
        return max(0, -(-(self.plan.total_slots - self.rows_consumed) // self.global_batch_size))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Batches from the current position on; each one handed out advances the position (state_dict)."""
        dataset = _Batches(self.plan, self.rows_consumed, self._remaining_batches(), self.global_batch_size,
                           self.rank * self.batch_size, self.batch_size)
        if self.num_workers > 0:
            source = iter(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                                                      pin_memory=self.pin_memory,
                                                      prefetch_factor=self.prefetch_factor))
        else:
            source = iter(dataset)
        pin = self.pin_memory and self.num_workers == 0 and torch.cuda.is_available()
        for batch in source:
            if _WORKER_ERROR in batch:
                raise UserError(batch[_WORKER_ERROR])
            if pin:
                batch = {k: v.pin_memory() for k, v in batch.items()}
            self.rows_consumed += self.global_batch_size
            yield batch

    def state_dict(self) -> dict:
        """The position (global rows consumed) and what identifies the data, for the training checkpoint."""
        return {
            "format": STATE_FORMAT,
            "rows_consumed": self.rows_consumed,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "shuffle": self.shuffle,
            "weights": list(self.weights),
            "stores": [s.fingerprint for s in self.stores],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position. The seed, seq_len, shuffle, weights and stores must be the same."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise UserError(f"not a {STATE_FORMAT} loader state: {str(state)[:200]}")
        mine = self.state_dict()
        for key in ("seed", "seq_len", "shuffle", "weights", "stores"):
            if state.get(key) != mine[key]:
                what = "token stores (their manifests)" if key == "stores" else key
                raise UserError(f"the loader state was saved with other {what}: {state.get(key)!r}, now "
                                f"{mine[key]!r}; resume with the data configuration of the saved run")
        rows = int(state["rows_consumed"])
        if rows < 0:
            raise UserError(f"bad loader state: rows_consumed = {rows}")
        self.rows_consumed = rows
