"""Corpus readers, tokenization into the token store, packing and the resumable loader.

    readers.read_documents(path, text_field="text", stats=ReadStats())   # .jsonl[.gz] / .json / .parquet / .txt[.gz]
    tokenize.tokenize_to_store(inputs, tokenizer="tokenizer.model", out="store", workers=8)   # gemma-ewc tokenize
    tokenize.tokenize_texts(["a few", "documents"], tokenizer=...)   # in memory: [np.ndarray[uint32]]
    store.TokenStore("store", expected_tokenizer_hash=...)           # manifest + uint32 shards + uint64 offsets
    packing.pack_documents(store_or_arrays, seq_len, bos_id=2, eos_id=1, pad_id=0)   # all rows of an epoch
    loader.PackedLoader(["lt_store", "en_store"], weights=[0.95, 0.05], seq_len=2048, batch_size=8, seed=0)

Submodules are imported on demand (only `loader` needs torch).
"""
