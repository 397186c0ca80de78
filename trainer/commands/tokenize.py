"""`gemma-ewc tokenize INPUT... --tokenizer MODEL --out DIR`: corpora into a token store (trainer.data.tokenize).

Prints the store's summary on stderr once the written store has been opened again, so a store that does not read
back is an error here, not in the first training run.
"""

from __future__ import annotations

import argparse
import sys

from trainer.data.readers import DEFAULT_CHUNK_BYTES
from trainer.data.store import DEFAULT_SHARD_TOKENS, MANIFEST, TokenStore
from trainer.data.tokenize import default_workers, load_tokenizer, tokenize_to_store
from trainer.fileio import check_output


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Tokenize corpora (JSON Lines, .jsonl.gz, Parquet, plain text with documents separated by blank lines) "
        "with a SentencePiece model into a token store (manifest.json + uint32 token shards + uint64 offsets). "
        "Documents are stored whole and without BOS/EOS; the packer adds those.")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="corpus files, or directories of them")
    parser.add_argument("--tokenizer", required=True, metavar="MODEL", help="SentencePiece model (tokenizer.model)")
    parser.add_argument("--out", required=True, metavar="DIR", help="the token store to create")
    parser.add_argument("--text-field", default="text", help="JSON field / Parquet column holding the text "
                        "(default: text)")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="tokenizer processes (default: the CPUs available, %(default)s here)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing store at --out (atomically)")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                        help="tokens per shard file (default: %(default)s)")
    parser.add_argument("--bos-id", type=int, default=None, help="BOS id, for a model that defines none")
    parser.add_argument("--eos-id", type=int, default=None, help="EOS id, for a model that defines none")
    parser.add_argument("--chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    check_output(args.out, inputs=[*args.inputs, args.tokenizer], overwrite=args.overwrite, directory=True,
                 owned_marker=MANIFEST, owned_kind="a token store")
    tok = load_tokenizer(args.tokenizer, bos_id=args.bos_id, eos_id=args.eos_id)
    report = tokenize_to_store(args.inputs, tokenizer=tok, out=args.out, workers=args.workers,
                               text_field=args.text_field, overwrite=args.overwrite, shard_tokens=args.shard_tokens,
                               chunk_bytes=args.chunk_bytes)
    TokenStore(report.out, expected_tokenizer_hash=tok.sha256)  # re-open: what we wrote reads back
    sys.stderr.write(f"gemma-ewc tokenize: {report.summary()}\n")
    return 0
