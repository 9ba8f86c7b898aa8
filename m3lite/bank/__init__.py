"""The memory bank on disk: explicit memories of references, their texts, and the indexes to find them.

The package, by concern: `format` (file names, record dtypes, the manifest, the writer lock), `index` (HNSW
over the sentence vectors, the word index), `reader` (`Bank`: opening, reading, search, verify, encode, merge),
`writer` (the append session and its commits) and `lazy` (memories encoded on first use).

A bank is a folder::

    manifest.json     the commit point, replaced atomically: shapes, fingerprint, committed lengths, checksums;
                      its own sha256 in "checksum"
    memories.bin      fixed-size records, one per reference (numpy structured dtype, read through memmap); empty
                      in a lazy bank (manifest memory.lazy), whose memories are in lazy.bin / lazy.idx: encoded
                      when first retrieved, append-only, outside the manifest (see m3lite.bank.lazy)
    checks.bin        one CHECK_DTYPE record per reference: crc32 of its memory, text, tokens, terms and vector
    refs.bin          one REF_DTYPE record per reference: document, char offsets, text slice, tokens, terms
    texts.bin         the reference texts, UTF-8, concatenated
    docs.jsonl        one line per document: id, title, source, sha256, first reference, reference count
    vectors.f32       the unit-normalised sentence embedding of each reference, [count, embed_dim] float32
    tokens.u32        each reference's token ids (<ref> first), n_tokens of them, one after the other
    terms.u64         each reference's word term ids (m3lite.lexical: its document's title, then its text)
    deleted.u32       tombstones: indices of removed documents (append-only, never rewritten)
    index.<gen>.hnsw  hnswlib index (cosine) of the first index.count vectors; name from the manifest
    lexical.<gen>.bin the BM25 index over the first lexical.count references' terms (flat arrays, mmap)
    array.<name>.<sha>.npy  named numeric arrays stored with the bank (e.g. the embedder's IDF weights)
    lock              held (flock) by the one writer

Every file but the manifest and the indexes is append-only. What a reader serves is checked as it is read:
checks.bin, refs.bin, docs.jsonl and deleted.u32 against their sha256 when the bank is opened; each memory,
text, token list, term list and vector against its crc32 in checks.bin when it is read; the index files against
their sha256 when they are loaded. Damage is a BankError naming the bank and the record, never used. A writer appends, fsyncs, then replaces the
manifest; readers map only the lengths their manifest committed, so a writer killed at any moment leaves
the previous commit intact and the next writer truncates the uncommitted tails. Removal appends tombstones
instead of rewriting records, so readers of an older manifest keep a consistent view and checksums of the
committed parts never change. The index is derived data: it may lag the vectors (search covers the tail
exactly), and tombstones newer than the index file are applied with mark_deleted when it is loaded.
"""
from __future__ import annotations

from .format import (CHECK_DTYPE, DATA_FILES, FORMAT, MANIFEST, REF_DTYPE, VERSION, BankBusyError, BankError,
                     FingerprintError, MemShape, record_dtype)
from .index import HnswIndex, index_text
from .reader import Bank

__all__ = ["Bank", "BankError", "BankBusyError", "FingerprintError", "HnswIndex", "MemShape", "record_dtype",
           "index_text", "FORMAT", "VERSION", "MANIFEST", "DATA_FILES", "REF_DTYPE", "CHECK_DTYPE"]
