"""Corpus readers, tokenization into the token store, packing and the resumable loader."""
