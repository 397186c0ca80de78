"""Tokenize corpora into a token store: `gemma-ewc tokenize INPUT... --tokenizer tokenizer.model --out DIR`.

    tok = load_tokenizer("gemma-2-2b/tokenizer.model")          # SentencePiece; BOS/EOS ids from the model
    tokenize_to_store(["lt.parquet"], tokenizer=tok, out="lt_store", workers=8)
    ids = tokenize_texts(["Labas rytas!"], tokenizer=tok)        # small in-memory use: [np.ndarray[uint32]]

The reading process cuts the inputs into chunks of whole documents (`readers.iter_chunks`, no parsing); worker
processes parse and encode them; the reading process writes the results in input order. Chunks, shards and the
manifest depend only on the inputs, so any number of workers writes byte-identical stores. In-flight chunks are
bounded (memory does not grow with the corpus), and the store appears atomically, complete or not at all.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import itertools
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from trainer.data.readers import DEFAULT_CHUNK_BYTES, Chunk, expand_inputs, iter_chunks, parse_chunk
from trainer.data.store import DEFAULT_SHARD_TOKENS, StoreWriter, check_output_dir
from trainer.errors import UserError
from trainer.fileio import atomic_path


class Tokenizer:
    """A SentencePiece model file (Gemma's tokenizer.model): encoding, decoding and the special ids, for token
    stores, the Fisher's text rows and evaluation alike. `sha256` is the hash of the file's bytes.

    BOS and EOS are the model's unless given; a model may define neither (-1): `load_tokenizer` insists on both
    (the packer writes them), eval checks them against the model's config.json (`check_tokenizer`).

    `pad_id` fills positions that hold no text and is never scored: under label -100 in packed rows (the token
    store's manifest records it), a document of its own in packed scoring rows, left padding that the KV cache
    masks out. Its value therefore changes no loss, score or generation; any id inside the vocabulary serves.
    One rule for every use: the model's pad piece, else EOS, else 0.
    """

    def __init__(self, path: str | os.PathLike, *, bos_id: int | None = None, eos_id: int | None = None) -> None:
        self.path = Path(path)
        self.sp, self.model_proto = read_sentencepiece(self.path)
        self.sha256 = hashlib.sha256(self.model_proto).hexdigest()
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id() if bos_id is None else bos_id
        self.eos_id = self.sp.eos_id() if eos_id is None else eos_id
        pad = self.sp.pad_id()
        self.pad_id = pad if pad >= 0 else max(self.eos_id, 0)

    def __repr__(self) -> str:
        return (f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, pad_id={self.pad_id})")

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS or EOS."""
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.sp.encode(list(texts))

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))

    def manifest_entry(self) -> dict:
        return {"file": self.path.name, "sha256": self.sha256, "vocab_size": self.vocab_size,
                "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id}


def read_sentencepiece(path: str | os.PathLike):
    """(SentencePieceProcessor, the file's bytes) of a SentencePiece model file; UserError if missing or invalid.

    The one loader of tokenizer files: `Tokenizer` (token stores, the Fisher's text rows, eval) and the Fisher's
    MMLU prompts open the model here.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"tokenizer {path} not found: give the SentencePiece model file (Gemma's tokenizer.model), "
                        f"e.g. with --tokenizer PATH")
    proto = path.read_bytes()
    try:
        return spm.SentencePieceProcessor(model_proto=proto), proto
    except (RuntimeError, OSError) as exc:
        raise UserError(f"{path} is not a SentencePiece model ({exc}); give Gemma's tokenizer.model") from None


def load_tokenizer(path: str | os.PathLike | Tokenizer, *, bos_id: int | None = None,
                   eos_id: int | None = None) -> Tokenizer:
    """A `Tokenizer` with BOS and EOS inside the vocabulary, as packing needs; they come from the model unless
    overridden (needed when it has none). A Tokenizer is returned as it is."""
    if isinstance(path, Tokenizer):
        return path
    tok = Tokenizer(path, bos_id=bos_id, eos_id=eos_id)
    for name, value in (("BOS", tok.bos_id), ("EOS", tok.eos_id)):
        if value < 0:
            raise UserError(f"{tok.path}: the model defines no {name} token; give its id explicitly "
                            f"(--{name.lower()}-id N)")
        if value >= tok.vocab_size:
            raise UserError(f"{tok.path}: {name} id {value} is outside the vocabulary of {tok.vocab_size}")
    return tok


class _Encoder:
    """SentencePiece batch encoding into one uint32 array plus lengths, one thread (parallelism is by process)."""

    def __init__(self, model_proto: bytes):
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        try:  # sentencepiece >= 0.2.1 returns int32 buffers directly: no Python int per token.
            self.sp.encode(["a"], out_type="numpy", num_threads=1)
            self.numpy = True
        except (ValueError, TypeError, RuntimeError):
            self.numpy = False

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if not texts:
            return np.zeros(0, np.uint32), np.zeros(0, np.int64)
        if self.numpy:
            ids = self.sp.encode(texts, out_type="numpy", num_threads=1)
            lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
            return np.concatenate(ids).view(np.uint32), lengths
        ids = self.sp.encode(texts, out_type=int, num_threads=1)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        return np.fromiter(itertools.chain.from_iterable(ids), dtype=np.uint32, count=int(lengths.sum())), lengths


_worker_encoder: _Encoder | None = None


def _init_worker(model_proto: bytes) -> None:
    global _worker_encoder
    _worker_encoder = _Encoder(model_proto)


def _encode_chunk(chunk: Chunk) -> tuple[np.ndarray, np.ndarray, int]:
    assert _worker_encoder is not None
    texts, replaced = parse_chunk(chunk)
    tokens, lengths = _worker_encoder(texts)
    return tokens, lengths, replaced


def tokenize_texts(texts: Iterable[str], *, tokenizer: str | os.PathLike | Tokenizer) -> list[np.ndarray]:
    """Token ids of each text (uint32, no BOS/EOS), in one process: for a few documents (tests, the demo)."""
    tok = load_tokenizer(tokenizer)
    tokens, lengths = _Encoder(tok.model_proto)(list(texts))
    return np.split(tokens, np.cumsum(lengths)[:-1]) if len(lengths) else []


@dataclasses.dataclass
class TokenizeReport:
    out: Path
    documents: int
    empty_documents: int
    tokens: int
    replaced: int
    seconds: float

    def summary(self) -> str:
        s = max(self.seconds, 1e-9)
        return (f"{self.documents:,} documents ({self.empty_documents:,} empty), {self.tokens:,} tokens in "
                f"{self.seconds:.1f} s: {self.documents / s:,.0f} documents/s, {self.tokens / s:,.0f} tokens/s; "
                f"{self.replaced:,} invalid UTF-8 bytes replaced; wrote {self.out}")


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _ordered_results(chunks: Iterator[tuple[int, Chunk]], tok: Tokenizer,
                     workers: int) -> Iterator[tuple[int, tuple[np.ndarray, np.ndarray, int]]]:
    if workers == 1:
        _init_worker(tok.model_proto)
        for source, chunk in chunks:
            yield source, _encode_chunk(chunk)
        return
    # fork starts in milliseconds (spawn costs ~0.3 s per worker of imports, a lot for a small corpus). The
    # workers are forked before anything is read, so no reader thread (pyarrow) is inherited; they use neither
    # torch nor pyarrow's thread pools. Where fork is missing (macOS, Windows) they are spawned.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    pool = concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method),
                                                  initializer=_init_worker, initargs=(tok.model_proto,))
    pending: collections.deque = collections.deque()
    try:
        for ready in [pool.submit(os.getpid) for _ in range(workers)]:  # start every worker now, before reading
            ready.result()
        for source, chunk in chunks:
            pending.append((source, pool.submit(_encode_chunk, chunk)))
            # Bounded look-ahead: enough to keep every worker busy, never the whole corpus in memory.
            if len(pending) > 2 * workers:
                source_done, future = pending.popleft()
                yield source_done, future.result()
        while pending:
            source_done, future = pending.popleft()
            yield source_done, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def tokenize_to_store(inputs: Sequence[str | os.PathLike], *, tokenizer: str | os.PathLike | Tokenizer,
                      out: str | os.PathLike, workers: int = 1, text_field: str = "text", overwrite: bool = False,
                      shard_tokens: int = DEFAULT_SHARD_TOKENS, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                      progress: bool | None = None) -> TokenizeReport:
    """Tokenize the documents of `inputs` (files or directories of them) into a token store at `out`.

    `progress`: a tqdm bar on stderr (default: when stderr is a terminal); the summary is always returned.
    """
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    tok = load_tokenizer(tokenizer)
    files = expand_inputs(list(inputs))
    check_output_dir(out, overwrite=overwrite)
    if progress is None:
        progress = sys.stderr.isatty()
    bar = None
    if progress:
        bar = tqdm(unit=" docs", desc="tokenize", file=sys.stderr, dynamic_ncols=True)
    sources = [{"path": str(p), "documents": 0, "tokens": 0, "replaced": 0} for p in files]
    chunks = ((i, chunk) for i, p in enumerate(files)  # lazy: read only once the workers run
              for chunk in iter_chunks(p, text_field=text_field, chunk_bytes=chunk_bytes))
    start = time.perf_counter()
    empty = 0
    try:
        with atomic_path(out, is_dir=True) as tmp:
            writer = StoreWriter(tmp, shard_tokens=shard_tokens)
            for source, (tokens, lengths, replaced) in _ordered_results(chunks, tok, workers):
                writer.add(tokens, lengths)
                entry = sources[source]
                entry["documents"] += len(lengths)
                entry["tokens"] += len(tokens)
                entry["replaced"] += replaced
                empty += int(np.count_nonzero(lengths == 0))
                if bar is not None:
                    bar.update(len(lengths))
                    elapsed = max(time.perf_counter() - start, 1e-9)
                    bar.set_postfix_str(f"{writer.num_tokens / elapsed:,.0f} tokens/s", refresh=False)
            writer.finish(tokenizer=tok.manifest_entry(), text_field=text_field, empty_documents=empty,
                          replaced=sum(s["replaced"] for s in sources), sources=sources)
    finally:
        if bar is not None:
            bar.close()
    return TokenizeReport(Path(out), writer.num_documents, empty, writer.num_tokens,
                          sum(s["replaced"] for s in sources), time.perf_counter() - start)
