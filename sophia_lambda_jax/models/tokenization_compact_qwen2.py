"""The tokenizer of an exported compact-vocabulary run, as transformers loads it.

`slj export` copies this file into the directory of a run trained on a compact vocabulary
(`data.CompactVocab`), beside `qwen2_bpe.json` (Qwen2's byte-level BPE) and
`compact_vocab.npy` (the run's id table), and names it in tokenizer_config.json's
`auto_map`. Then

    tokenizer = AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)

encodes text as the run was trained: Qwen2's BPE splits it into Qwen2 tokens, each kept
token becomes its compact id and every dropped one UNK's id; UNK decodes to "<|unk|>".

Why code and not a tokenizer.json: a tokenizer.json's BPE identifies the pieces it merges by
their ids, so giving every dropped token UNK's id would merge "ab" + "c" wherever any two
dropped pieces meet. Here the merges run over Qwen2's own ids and the compact ids are looked
up afterwards.

The package never imports this module: it runs inside transformers (which brings tokenizers
and numpy), so it imports them at the top and nothing from sophia_lambda_jax.
"""

import os
import shutil

import numpy as np
from tokenizers import Tokenizer, decoders
from transformers import PreTrainedTokenizer

BPE_FILE = "qwen2_bpe.json"
TABLE_FILE = "compact_vocab.npy"


class CompactQwen2Tokenizer(PreTrainedTokenizer):
  """Qwen2's BPE onto a compact vocabulary: compact ids 0 .. V-3 are the kept Qwen2 tokens,
  V-2 is `<|endoftext|>`, V-1 is UNK (every other token).

  Args:
    bpe_file: Qwen2's BPE as a tokenizers JSON file without added tokens (special-token
      text is plain text to it, as in the training data).
    table_file: the run's table, compact id -> Qwen2 id (-1 for UNK), as `np.save` wrote it.
  """

  vocab_files_names = {"bpe_file": BPE_FILE, "table_file": TABLE_FILE}
  model_input_names = ["input_ids", "attention_mask"]

  def __init__(self, bpe_file, table_file, unk_token="<|unk|>", eos_token="<|endoftext|>",
               pad_token="<|endoftext|>", **kwargs):
    self.bpe_file, self.table_file = bpe_file, table_file
    self.bpe = Tokenizer.from_file(bpe_file)
    qwen_ids = np.load(table_file)
    qwen_strings = {i: s for s, i in self.bpe.get_vocab().items()}
    self.strings = [qwen_strings[int(i)] for i in qwen_ids[:-2]] + [str(eos_token),
                                                                    str(unk_token)]
    self.ids = {s: i for i, s in enumerate(self.strings)}
    self.unk_id = len(self.strings) - 1
    self.byte_level = decoders.ByteLevel()
    # The base class reads the vocabulary while it registers the special tokens.
    super().__init__(unk_token=unk_token, eos_token=eos_token, pad_token=pad_token, **kwargs)

  @property
  def vocab_size(self) -> int:
    return len(self.strings)

  def get_vocab(self) -> dict[str, int]:
    return dict(self.ids)

  def _tokenize(self, text, **kwargs):
    return self.bpe.encode(text, add_special_tokens=False).tokens

  def _convert_token_to_id(self, token):
    return self.ids.get(token, self.unk_id)

  def _convert_id_to_token(self, index):
    return self.strings[index]

  def convert_tokens_to_string(self, tokens):
    # Special tokens are printable ASCII, which byte-level decoding leaves as it is.
    return self.byte_level.decode(tokens)

  def save_vocabulary(self, save_directory, filename_prefix=None):
    prefix = f"{filename_prefix}-" if filename_prefix else ""
    written = []
    for source, name in ((self.bpe_file, BPE_FILE), (self.table_file, TABLE_FILE)):
      target = os.path.join(save_directory, prefix + name)
      if os.path.abspath(source) != os.path.abspath(target):
        shutil.copyfile(source, target)
      written.append(target)
    return tuple(written)
