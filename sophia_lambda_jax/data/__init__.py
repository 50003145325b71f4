"""Data pipeline: Qwen2 tokenizer, sources, uint32 token shards and a deterministic loader.

    from sophia_lambda_jax import data
    out = data.prepare("builtin", "/tmp/builtin")      # or `slj tokenize SOURCE OUT`
    batches = data.TokenBatches(out, "train", batch_size=16, seq_len=512, seed=0,
                                vocab_size=8192)
    rows = batches.batch(step)                          # int32 (16, 513)

This package imports neither the models nor the optimizers.
"""

from sophia_lambda_jax.data.loader import (
    COMPACT_VOCAB_FILE,
    CompactVocab,
    UNK_TEXT,
    TokenBatches,
    feistel_permutation,
)
from sophia_lambda_jax.data.preparation import (
    BUILTIN_VAL_FRACTION,
    DEFAULT_VAL_FRACTION,
    builtin_dataset_dir,
    cli_tokenize,
    load_manifest,
    prepare,
    resolve_data,
)
from sophia_lambda_jax.data.shards import read_header, write_shard
from sophia_lambda_jax.data.sources import builtin_documents, is_validation
from sophia_lambda_jax.data.tokenizer import EOS_ID, QWEN_VOCAB_SIZE, get_tokenizer

__all__ = [
    "EOS_ID", "QWEN_VOCAB_SIZE", "get_tokenizer", "prepare", "builtin_dataset_dir",
    "resolve_data", "load_manifest", "TokenBatches", "CompactVocab", "COMPACT_VOCAB_FILE",
    "UNK_TEXT", "cli_tokenize",
    "builtin_documents", "is_validation", "read_header", "write_shard", "feistel_permutation",
    "DEFAULT_VAL_FRACTION", "BUILTIN_VAL_FRACTION",
]
