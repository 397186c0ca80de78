"""The token store: documents tokenized once, stored as raw token ids (no BOS/EOS; the packer adds them).

A directory:

    manifest.json           format, version, tokenizer (sha256 of tokenizer.model, vocabulary size, BOS/EOS/pad
                            ids), document and token counts, the shards, the sources and what was replaced
    tokens-00000.u32        little-endian uint32 token ids of consecutive documents
    offsets-00000.u64       little-endian uint64, documents + 1 entries: document i of the shard is
                            tokens[offsets[i]:offsets[i + 1]]; offsets[0] == 0, offsets[-1] == the shard's tokens
    ...

Documents never straddle shards; document numbers run across shards in order. Empty documents are kept (so
document i is the i-th input document) and skipped by the packer.

    store = TokenStore("lt_store", expected_tokenizer_hash=sha256_file("tokenizer.model"))
    store.num_documents, store.num_tokens, store.document(0)      # np.ndarray[uint32], a view of the shard

Opening validates everything that is cheap (format and version, the tokenizer hash, every file's size against the
manifest, the offsets and their sha256). A token shard is verified the first time a process reads from it: its
sha256 against the manifest and every id below the vocabulary size, so a shard changed after tokenizing (even
rewritten at the same size) is an error naming it before any of its tokens is used. That costs one extra read of
each shard per process that reads it (sha256 at about 1-2 GB/s: under a second per 1 GiB shard), spread over the
run as shards are first touched, instead of re-reading the whole corpus at every start. `verify()` checks all
shards at once.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from trainer.errors import UserError
from trainer.fileio import check_output, sha256_file

FORMAT = "gemma-ewc/token-store"
VERSION = 1
MANIFEST = "manifest.json"
TOKEN_DTYPE = np.dtype("<u4")
OFFSET_DTYPE = np.dtype("<u8")
DEFAULT_SHARD_TOKENS = 1 << 28  # 1 GiB of tokens per shard


def check_output_dir(out: str | os.PathLike, *, overwrite: bool) -> None:
    """Refuse to replace an existing directory unless `overwrite`, and never replace one that is not a token store."""
    check_output(out, overwrite=overwrite, directory=True, owned_marker=MANIFEST, owned_kind="a token store")


class StoreWriter:
    """Appends documents to shards in `directory` (normally a temporary one from `atomic_path`).

    `add(tokens, lengths)` takes many documents at once: their tokens concatenated and their lengths. Output is
    a pure function of the documents added, so the same inputs give byte-identical files.
    """

    def __init__(self, directory: str | os.PathLike, *, shard_tokens: int = DEFAULT_SHARD_TOKENS):
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
        self.directory = Path(directory)
        self.shard_tokens = shard_tokens
        self.shards: list[dict] = []
        self.num_documents = 0
        self.num_tokens = 0
        self._fh = None
        self._hash = None
        self._offsets: list[np.ndarray] = []
        self._shard_docs = 0
        self._shard_len = 0

    def _open_shard(self) -> None:
        name = f"tokens-{len(self.shards):05d}.u32"
        self._fh = open(self.directory / name, "wb")
        self._hash = hashlib.sha256()
        self._offsets = [np.zeros(1, dtype=np.int64)]
        self._shard_docs = 0
        self._shard_len = 0
        self.shards.append({"tokens_file": name, "offsets_file": f"offsets-{len(self.shards):05d}.u64"})

    def _close_shard(self) -> None:
        assert self._fh is not None and self._hash is not None
        self._fh.close()
        self._fh = None
        offsets = np.concatenate(self._offsets).astype(OFFSET_DTYPE)
        entry = self.shards[-1]
        offsets_bytes = offsets.tobytes()
        (self.directory / entry["offsets_file"]).write_bytes(offsets_bytes)
        entry.update(documents=self._shard_docs, tokens=self._shard_len, tokens_sha256=self._hash.hexdigest(),
                     offsets_sha256=hashlib.sha256(offsets_bytes).hexdigest())

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        tokens = np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE)
        lengths = np.asarray(lengths, dtype=np.int64)
        assert tokens.ndim == 1 and lengths.ndim == 1 and int(lengths.sum()) == len(tokens)
        ends = np.cumsum(lengths)
        done_docs = 0
        while done_docs < len(lengths):
            if self._fh is None:
                self._open_shard()
            base = int(ends[done_docs - 1]) if done_docs else 0
            room = self.shard_tokens - self._shard_len
            # Documents that still fit in this shard (at least one, so a huge document gets a shard of its own).
            fit = int(np.searchsorted(ends[done_docs:], base + room, side="right"))
            if fit == 0:
                if self._shard_docs:
                    self._close_shard()
                    continue
                fit = 1
            stop = done_docs + fit
            end = int(ends[stop - 1])
            piece = tokens[base:end]
            self._fh.write(memoryview(piece).cast("B"))
            self._hash.update(memoryview(piece).cast("B"))
            self._offsets.append(ends[done_docs:stop] - base + self._shard_len)
            self._shard_docs += fit
            self._shard_len += end - base
            done_docs = stop
            if self._shard_len >= self.shard_tokens:
                self._close_shard()
        self.num_documents += len(lengths)
        self.num_tokens += len(tokens)

    def finish(self, *, tokenizer: dict, **extra) -> dict:
        """Close the last shard and write manifest.json; returns the manifest."""
        if self._fh is not None:
            self._close_shard()
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "token_dtype": TOKEN_DTYPE.str,
            "offset_dtype": OFFSET_DTYPE.str,
            "tokenizer": tokenizer,
            "documents": self.num_documents,
            "tokens": self.num_tokens,
            **extra,
            "shards": self.shards,
        }
        (self.directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        return manifest


def _bad(path: Path, what: str) -> UserError:
    return UserError(f"{path}: {what}")


class TokenStore:
    """A token store opened read-only (memory-mapped shards). See the module doc for the layout.

    Attributes: `manifest`, `num_documents`, `num_tokens`, `vocab_size`, `bos_id`, `eos_id`, `pad_id`,
    `tokenizer_hash`, `doc_offsets` (int64 [documents + 1], token offsets with the shards laid end to end),
    `shards` (uint32 arrays), `shard_starts` (int64 [shards + 1], where each shard begins in that global order).
    """

    def __init__(self, path: str | os.PathLike, *, expected_tokenizer_hash: str | None = None):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not self.path.is_dir():
            raise FileNotFoundError(2, "token store not found", str(self.path))
        if not manifest_path.is_file():
            raise _bad(self.path, f"not a token store (no {MANIFEST}); create one with `gemma-ewc tokenize`")
        raw = manifest_path.read_bytes()
        try:
            manifest = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _bad(manifest_path, f"not valid JSON ({exc}); the store is damaged, re-create it") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise _bad(manifest_path, f"not a {FORMAT} manifest")
        if manifest.get("version") != VERSION:
            raise _bad(manifest_path, f"token store version {manifest.get('version')!r} is not supported (this "
                                      f"gemma-ewc reads version {VERSION}); re-create the store with "
                                      "`gemma-ewc tokenize` or use the gemma-ewc version that wrote it")
        self.manifest = manifest
        self.fingerprint = hashlib.sha256(raw).hexdigest()
        try:
            tok = manifest["tokenizer"]
            self.tokenizer_hash = str(tok["sha256"])
            self.vocab_size = int(tok["vocab_size"])
            self.bos_id = int(tok["bos_id"])
            self.eos_id = int(tok["eos_id"])
            self.pad_id = int(tok["pad_id"])
            self.num_documents = int(manifest["documents"])
            self.num_tokens = int(manifest["tokens"])
            shard_entries = list(manifest["shards"])
            if manifest["token_dtype"] != TOKEN_DTYPE.str or manifest["offset_dtype"] != OFFSET_DTYPE.str:
                raise _bad(manifest_path, f"unsupported dtypes {manifest['token_dtype']}/{manifest['offset_dtype']}")
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, UserError):
                raise
            raise _bad(manifest_path, f"manifest lacks or mangles {exc}; the store is damaged, re-create it") from None
        if expected_tokenizer_hash is not None and expected_tokenizer_hash != self.tokenizer_hash:
            raise _bad(self.path, f"was tokenized with another tokenizer (sha256 {self.tokenizer_hash[:16]}…, "
                                  f"tokenizer file {tok.get('file')!r}) than the one configured (sha256 "
                                  f"{expected_tokenizer_hash[:16]}…); re-tokenize the corpus with this tokenizer")
        self.shards: list[np.ndarray] = []
        offsets: list[np.ndarray] = [np.zeros(1, dtype=np.int64)]
        shard_starts = [0]
        try:
            specs = [(int(e["tokens"]), int(e["documents"]), self.path / e["tokens_file"], self.path / e["offsets_file"])
                     for e in shard_entries]
        except (KeyError, TypeError, ValueError) as exc:
            raise _bad(manifest_path, f"a shard entry lacks or mangles {exc}; the store is damaged, re-create it"
                       ) from None
        for entry, (tokens, docs, tok_path, off_path) in zip(shard_entries, specs):
            for p, want in ((tok_path, tokens * TOKEN_DTYPE.itemsize), (off_path, (docs + 1) * OFFSET_DTYPE.itemsize)):
                if not p.is_file():
                    raise _bad(p, "shard file missing; the store is incomplete, re-create or re-copy it")
                have = p.stat().st_size
                if have != want:
                    raise _bad(p, f"has {have} bytes, the manifest says {want}: the shard is truncated or damaged; "
                                  "re-copy or re-create the store")
            off_bytes = off_path.read_bytes()
            if "offsets_sha256" in entry and hashlib.sha256(off_bytes).hexdigest() != entry["offsets_sha256"]:
                raise _bad(off_path, "content does not match its sha256 in the manifest: the shard changed after "
                                     "tokenizing; re-copy or re-create the store")
            off = np.frombuffer(off_bytes, dtype=OFFSET_DTYPE).astype(np.int64)
            if off[0] != 0 or off[-1] != tokens or (docs and np.any(np.diff(off) < 0)):
                raise _bad(off_path, "document offsets are inconsistent; the store is damaged, re-create it")
            # A plain ndarray view of the map (slicing a np.memmap costs ~1 us of Python per slice).
            self.shards.append(np.memmap(tok_path, dtype=TOKEN_DTYPE, mode="r").view(np.ndarray) if tokens
                               else np.zeros(0, dtype=TOKEN_DTYPE))
            offsets.append(off[1:] + shard_starts[-1])
            shard_starts.append(shard_starts[-1] + tokens)
        self._verified = [not len(shard) for shard in self.shards]
        self._unverified = self._verified.count(False)
        self.doc_offsets = np.concatenate(offsets)
        self.shard_starts = np.asarray(shard_starts, dtype=np.int64)
        if len(self.doc_offsets) != self.num_documents + 1 or self.shard_starts[-1] != self.num_tokens:
            raise _bad(manifest_path, "document or token counts disagree with the shards; the store is damaged")

    def __len__(self) -> int:
        return self.num_documents

    def __reduce__(self):
        # Pickled (e.g. into a loader worker) by path, not by content; reopening checks it is the same store.
        return _reopen, (str(self.path), self.fingerprint)

    def __repr__(self) -> str:
        return f"TokenStore({str(self.path)!r}, documents={self.num_documents}, tokens={self.num_tokens})"

    @property
    def doc_lengths(self) -> np.ndarray:
        return np.diff(self.doc_offsets)

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Global token range [start, stop) inside one shard (any range inside one document is)."""
        shard = int(np.searchsorted(self.shard_starts, start, side="right")) - 1
        base = int(self.shard_starts[shard])
        assert stop <= self.shard_starts[shard + 1] or start == stop
        if self._unverified:
            self.verify_shards((shard,))
        return self.shards[shard][start - base:stop - base] if start < stop else np.zeros(0, TOKEN_DTYPE)

    def document(self, i: int) -> np.ndarray:
        if not -self.num_documents <= i < self.num_documents:
            raise IndexError(f"document {i} out of range ({self.num_documents} documents)")
        i %= self.num_documents
        return self.tokens(int(self.doc_offsets[i]), int(self.doc_offsets[i + 1]))

    def _verify_tokens(self, shard: int) -> None:
        entry = self.manifest["shards"][shard]
        path = self.path / entry["tokens_file"]
        if "tokens_sha256" in entry and sha256_file(path) != entry["tokens_sha256"]:
            raise _bad(path, "content does not match its sha256 in the manifest: the shard changed after "
                             "tokenizing; re-copy or re-create the store")
        top = int(self.shards[shard].max())
        if top >= self.vocab_size:
            raise _bad(path, f"holds token id {top} >= the store's vocabulary size {self.vocab_size}; the store is "
                             f"damaged, re-create it with `gemma-ewc tokenize`")
        self._verified[shard] = True
        self._unverified -= 1

    def verify_shards(self, shards) -> None:
        """Verify the shards among `shards` (indices) that this process has not verified yet; called before a read."""
        if not self._unverified:
            return
        for shard in sorted(set(np.asarray(shards).reshape(-1).tolist())):
            if not self._verified[shard]:
                self._verify_tokens(shard)

    def verify(self) -> None:
        """Check every shard now (sha256 against the manifest, ids against the vocabulary): reads the whole store."""
        self.verify_shards(range(len(self.shards)))


def _reopen(path: str, fingerprint: str) -> TokenStore:
    store = TokenStore(path)
    if store.fingerprint != fingerprint:
        raise UserError(f"{path}: the token store changed while in use (its manifest differs); restart the run")
    return store
