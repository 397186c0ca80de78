"""Tokenization into the token store: content, byte-identical reruns, atomic output, and bad input."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil

import numpy as np
import pytest
import sentencepiece as spm

from tests.helpers import train_tiny_tokenizer
from trainer.cli import main as cli_main
from trainer.data.readers import read_documents
from trainer.data.store import TokenStore
from trainer.data.tokenize import load_tokenizer, read_sentencepiece, tokenize_texts, tokenize_to_store
from trainer.errors import UserError

WORDS = ["labas", "rytas", "ačiū", "žodis", "šuo", "katė", "the", "and", "of", "model", "token", "packing", "ėė"]


def _train(path, **ids):
    rng = random.Random(0)
    text = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))) for _ in range(300)]
    return train_tiny_tokenizer(path, text, vocab_size=300, hard_vocab_limit=False, **ids)


@pytest.fixture(scope="module")
def gemma_like(tmp_path_factory):
    """A tiny SentencePiece model with Gemma's special ids: pad 0, EOS 1, BOS 2, unk 3."""
    return _train(tmp_path_factory.mktemp("tok") / "tokenizer.model")


def _corpus(path, seed, n=200):
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        k = 0 if i % 17 == 3 else rng.choice([1, 3, 40, 300])
        docs.append(" ".join(rng.choice(WORDS) for _ in range(k)))
    with open(path, "w") as fh:
        for d in docs:
            fh.write(json.dumps({"text": d}) + "\n")
    return docs


def _files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_store_holds_each_document_exactly(tmp_path, seed, gemma_like):
    docs = _corpus(tmp_path / "c.jsonl", seed)
    report = tokenize_to_store([tmp_path / "c.jsonl"], tokenizer=gemma_like, out=tmp_path / "s", shard_tokens=500,
                               chunk_bytes=999)
    store = TokenStore(tmp_path / "s", expected_tokenizer_hash=load_tokenizer(gemma_like).sha256)
    expected = tokenize_texts(docs, tokenizer=gemma_like)
    assert store.num_documents == len(docs) == report.documents
    assert store.num_tokens == sum(map(len, expected)) == report.tokens
    assert len(store.manifest["shards"]) > 3
    for i, ids in enumerate(expected):
        assert store.document(i).dtype == np.uint32
        assert np.array_equal(store.document(i), ids)
    m = store.manifest
    assert (m["tokenizer"]["bos_id"], m["tokenizer"]["eos_id"], m["tokenizer"]["pad_id"]) == (2, 1, 0)
    assert m["empty_documents"] == sum(1 for d in docs if not d) > 0
    assert m["tokenizer"]["vocab_size"] == spm.SentencePieceProcessor(model_file=str(gemma_like)).get_piece_size()
    store.verify()


def test_reruns_are_byte_identical_for_any_workers_and_chunking(tmp_path, seed, gemma_like):
    _corpus(tmp_path / "a.jsonl", seed)
    _corpus(tmp_path / "b.jsonl", seed + 1)
    inputs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    tokenize_to_store(inputs, tokenizer=gemma_like, out=tmp_path / "one", workers=1, shard_tokens=2000)
    tokenize_to_store(inputs, tokenizer=gemma_like, out=tmp_path / "two", workers=2, shard_tokens=2000,
                      chunk_bytes=1500)
    assert _files(tmp_path / "one") == _files(tmp_path / "two")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_shared_text_corpus(tmp_path, shared_data):
    model = shared_data / "tokenizers" / "botchan_en_unigram_1000.model"
    text = shared_data / "text" / "lt_alksnis.txt"
    tokenize_to_store([text], tokenizer=model, out=tmp_path / "s", workers=2)
    store = TokenStore(tmp_path / "s")
    docs = list(read_documents(text))
    assert store.num_documents == len(docs)
    for i in (0, len(docs) // 2, len(docs) - 1):
        assert np.array_equal(store.document(i), tokenize_texts([docs[i]], tokenizer=model)[0])
    assert (store.bos_id, store.eos_id) == (1, 2)  # that model's own ids


def test_existing_output_needs_overwrite_and_is_replaced_atomically(tmp_path, gemma_like):
    _corpus(tmp_path / "c.jsonl", 1)
    out = tmp_path / "s"
    tokenize_to_store([tmp_path / "c.jsonl"], tokenizer=gemma_like, out=out)
    before = _files(out)
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        tokenize_to_store([tmp_path / "c.jsonl"], tokenizer=gemma_like, out=out)
    _corpus(tmp_path / "d.jsonl", 2)
    # a failing run (missing field half-way) leaves the old store untouched
    with open(tmp_path / "d.jsonl", "a") as fh:
        fh.write('{"body": "x"}\n')
    with pytest.raises(UserError, match="no field 'text'"):
        tokenize_to_store([tmp_path / "d.jsonl"], tokenizer=gemma_like, out=out, overwrite=True, workers=2)
    assert _files(out) == before
    tokenize_to_store([tmp_path / "c.jsonl", tmp_path / "c.jsonl"], tokenizer=gemma_like, out=out, overwrite=True)
    assert TokenStore(out).num_documents == 2 * 200
    not_a_store = tmp_path / "home"
    not_a_store.mkdir()
    (not_a_store / "precious.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a token store"):
        tokenize_to_store([tmp_path / "c.jsonl"], tokenizer=gemma_like, out=not_a_store, overwrite=True)
    assert (not_a_store / "precious.txt").read_text() == "keep me"


def test_bad_stores_each_give_one_clear_error(tmp_path, gemma_like):
    _corpus(tmp_path / "c.jsonl", 3)
    good = tmp_path / "good"
    tokenize_to_store([tmp_path / "c.jsonl"], tokenizer=gemma_like, out=good)
    other = _train(tmp_path / "other.model", bos_id=1, eos_id=2, unk_id=0, pad_id=-1)
    with pytest.raises(UserError, match="another tokenizer"):
        TokenStore(good, expected_tokenizer_hash=load_tokenizer(other).sha256)

    truncated = tmp_path / "truncated"
    shutil.copytree(good, truncated)
    shard = truncated / "tokens-00000.u32"
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(UserError, match="tokens-00000.u32: has .* bytes, the manifest says .*truncated"):
        TokenStore(truncated)

    future = tmp_path / "future"
    shutil.copytree(good, future)
    m = json.loads((future / "manifest.json").read_text())
    m["version"] = 99
    (future / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="version 99 is not supported"):
        TokenStore(future)

    flipped = tmp_path / "flipped"
    shutil.copytree(good, flipped)
    data = bytearray((flipped / "tokens-00000.u32").read_bytes())
    data[0] ^= 1
    (flipped / "tokens-00000.u32").write_bytes(bytes(data))
    TokenStore(flipped)  # sizes are fine: opening is cheap and does not read the tokens
    with pytest.raises(UserError, match="tokens-00000.u32: content does not match its sha256"):
        TokenStore(flipped).verify()
    with pytest.raises(UserError, match="tokens-00000.u32: content does not match its sha256.*changed after"):
        TokenStore(flipped).document(0)  # the first read of a shard verifies it

    beyond = tmp_path / "beyond"  # ids past the vocabulary, with a manifest hash that matches them
    shutil.copytree(good, beyond)
    tokens = np.fromfile(beyond / "tokens-00000.u32", dtype=np.uint32)
    tokens[len(tokens) // 2] = 70_000
    tokens.tofile(beyond / "tokens-00000.u32")
    m = json.loads((beyond / "manifest.json").read_text())
    m["shards"][0]["tokens_sha256"] = hashlib.sha256(tokens.tobytes()).hexdigest()
    (beyond / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="tokens-00000.u32: holds token id 70000 >= the store's vocabulary size"):
        TokenStore(beyond).document(0)

    with pytest.raises(UserError, match="not a token store"):
        TokenStore(tmp_path)
    for p in (truncated, future, flipped, beyond):  # opening and reading never write
        assert sorted(x.name for x in p.iterdir()) == sorted(x.name for x in good.iterdir())


def test_model_without_bos_eos_needs_explicit_ids(tmp_path):
    model = _train(tmp_path / "nobos.model", bos_id=-1, eos_id=-1, unk_id=0, pad_id=-1)
    with pytest.raises(UserError, match="defines no BOS token; give its id explicitly"):
        load_tokenizer(model)
    tok = load_tokenizer(model, bos_id=5, eos_id=6)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (5, 6, 6)


def test_missing_or_invalid_tokenizer_is_one_clear_error_everywhere(tmp_path):
    from trainer.evaluate.scoring import Tokenizer

    (tmp_path / "junk.model").write_bytes(b"not a model")
    for load in (load_tokenizer, read_sentencepiece, Tokenizer):  # token stores, the Fisher, eval
        with pytest.raises(UserError, match="tokenizer .*missing.model not found: give the SentencePiece model"):
            load(tmp_path / "missing.model")
        with pytest.raises(UserError, match="junk.model is not a SentencePiece model"):
            load(tmp_path / "junk.model")


def test_cli_tokenize(tmp_path, gemma_like, capsys):
    _corpus(tmp_path / "c.jsonl", 4)
    args = ["tokenize", str(tmp_path / "c.jsonl"), "--tokenizer", str(gemma_like), "--out", str(tmp_path / "s"),
            "--workers", "1"]
    assert cli_main(args) == 0
    err = capsys.readouterr().err
    assert "200 documents" in err and "tokens/s" in err and "invalid UTF-8 bytes replaced" in err
    assert cli_main(args) == 2
    assert "already exists" in capsys.readouterr().err
    (tmp_path / "f.jsonl").write_text('{"body": "x"}\n')
    bad = ["tokenize", str(tmp_path / "f.jsonl"), "--tokenizer", str(gemma_like), "--out", str(tmp_path / "t")]
    assert cli_main(bad) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "f.jsonl:1: no field 'text'" in err
    assert not os.path.exists(tmp_path / "t")
