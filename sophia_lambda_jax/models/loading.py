"""A model with the tokenizer of its vocabulary, and its validation loss.

    from sophia_lambda_jax import models
    loaded = models.load_hf("Qwen2.5-0.5B")      # a HuggingFace Qwen2 directory
    ids = loaded.tokenizer.encode("Once upon a time")
    out = models.sampler.generate(loaded.model, ids, 20)
    print(loaded.tokenizer.decode(out[len(ids):]))

`VocabTokenizer` maps text to the ids of a model's vocabulary (Qwen2's, or a compact one) and
back; `evaluate` is the token-mean cross-entropy over validation batches. The model of a
training run (and `load` of either kind of directory) is `sophia_lambda_jax.runs`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sophia_lambda_jax.data import UNK_TEXT, get_tokenizer
from sophia_lambda_jax.models import hf, output_layer, qwen


class VocabTokenizer:
  """Text <-> the ids of a model's vocabulary: the Qwen2 ids, or a compact vocabulary's.

  With a compact vocabulary, text whose Qwen2 ids were dropped encodes to UNK and UNK
  decodes to `data.UNK_TEXT` ("<|unk|>"). Special-token text in `encode`'s input is plain
  text (as in the training data; see `data.tokenizer`).
  """

  def __init__(self, vocab_size: int, compact=None):
    self.qwen = get_tokenizer()
    self.compact = compact
    self.vocab_size = int(vocab_size)
    self.eos_id = self.qwen.eos_id if compact is None else compact.eos_id

  def encode(self, text: str) -> np.ndarray:
    ids = np.asarray(self.qwen.encode(text), np.int64)
    if self.compact is not None:
      return self.compact.forward[ids].astype(np.int32)
    if ids.size and ids.max() >= self.vocab_size:
      raise ValueError(f"text encodes to Qwen2 id {int(ids.max())}, outside the model's "
                       f"vocabulary of {self.vocab_size}")
    return ids.astype(np.int32)

  def decode(self, ids) -> str:
    ids = np.asarray(ids, np.int64).reshape(-1)
    if self.compact is None:
      return self.qwen.decode(ids)
    qwen_ids = self.compact.to_qwen(ids)
    # Decode runs between UNKs together: a character can span several byte-level tokens.
    pieces, run = [], []
    for token in qwen_ids.tolist():
      if token < 0:
        pieces += [self.qwen.decode(run), UNK_TEXT]
        run = []
      else:
        run.append(token)
    return "".join(pieces) + self.qwen.decode(run)


class Loaded(NamedTuple):
  """What `load_hf` and `runs.load` return.

  model: the Qwen module. tokenizer: its `VocabTokenizer`. step: the checkpoint's step
  (None for a HuggingFace directory). run_config: the run's TrainConfig dict (None for a
  HuggingFace directory).
  """
  model: qwen.Qwen
  tokenizer: VocabTokenizer
  step: int | None
  run_config: dict[str, Any] | None


def load_hf(path, compute_dtype: str | None = None) -> Loaded:
  """The model of a HuggingFace Qwen2 directory (config.json + *.safetensors) with its
  tokenizer: Qwen2's, or for the export of a compact-vocabulary run (`compact_vocab.npy`
  beside the weights) that vocabulary's; `compute_dtype` "float32" (None: the default) or
  "bfloat16". A training run's model is `sophia_lambda_jax.runs.load`."""
  overrides = {} if compute_dtype is None else {"compute_dtype": compute_dtype}
  model = hf.from_hf(path, **overrides)
  compact = hf.read_compact_vocab(path)
  if compact is not None and compact.size != model.config.vocab_size:
    raise ValueError(f"{path}: compact_vocab.npy holds {compact.size} ids, config.json's "
                     f"vocab_size is {model.config.vocab_size}")
  return Loaded(model, VocabTokenizer(model.config.vocab_size, compact), None, None)


# ----------------------------------------------------------------------------- evaluate


@jax.jit
def _batch_loss(graphdef_and_state, rows):
  graphdef, state = graphdef_and_state
  hidden, head = nnx.merge(graphdef, state).features(rows[:, :-1])
  return output_layer.cross_entropy(hidden, head, rows[:, 1:])[0]


def evaluate(model: qwen.Qwen, batches, num_batches: int) -> dict[str, float | int]:
  """Token-mean cross-entropy of `model` over the first `num_batches` batches of
  `batches` (a `data.TokenBatches` of the val split): loss, perplexity, tokens, batches."""
  num_batches = min(int(num_batches), batches.num_batches)
  if num_batches < 1:
    raise ValueError(f"num_batches must be >= 1, got {num_batches}")
  state = nnx.split(model)
  losses = [float(_batch_loss(state, jnp.asarray(batches.batch(i))))
            for i in range(num_batches)]
  loss = float(np.mean(losses))
  return {"loss": loss, "perplexity": math.exp(loss),
          "tokens": num_batches * batches.local_batch_size * batches.seq_len,
          "batches": num_batches}
