"""A model (and its tokenizer) from a training run or a HuggingFace directory; evaluation.

    from sophia_lambda_jax import models
    loaded = models.load("runs/demo")            # or a HuggingFace Qwen2 directory
    ids = loaded.tokenizer.encode("Once upon a time")
    out = models.sampler.generate(loaded.model, ids, 20)
    print(loaded.tokenizer.decode(out[len(ids):]))

A run directory (`slj train --out`) is recognised by its `checkpoints/` (or its TrainConfig
`config.json`); its newest complete
checkpoint is loaded. The run stores what it needs to rebuild and decode the model:
`model.json` (the QwenConfig it trained) and, for a compact vocabulary, `compact_vocab.npy`
(the id table). Runs written before these files existed are rebuilt from `config.json`
(preset + overrides) and, for a compact vocabulary, from the data folder it names.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sophia_lambda_jax.models import qwen


class VocabTokenizer:
  """Text <-> the ids of a model's vocabulary: the Qwen2 ids, or a compact vocabulary's.

  With a compact vocabulary, text whose Qwen2 ids were dropped encodes to UNK and UNK
  decodes to U+FFFD. Special-token text in `encode`'s input is plain text (as in the
  training data; see `data.tokenizer`).
  """

  def __init__(self, vocab_size: int, compact=None):
    from sophia_lambda_jax.data import get_tokenizer

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
        pieces += [self.qwen.decode(run), "\ufffd"]
        run = []
      else:
        run.append(token)
    return "".join(pieces) + self.qwen.decode(run)


class Loaded(NamedTuple):
  """What `load` returns.

  model: the Qwen module. tokenizer: its `VocabTokenizer`. step: the checkpoint's step
  (None for a HuggingFace directory). run_config: the run's TrainConfig dict (None for a
  HuggingFace directory).
  """
  model: qwen.Qwen
  tokenizer: VocabTokenizer
  step: int | None
  run_config: dict[str, Any] | None


def is_run_directory(path) -> bool:
  """Whether `path` was written by `slj train` (checkpoints/, or a TrainConfig config.json)."""
  path = Path(path)
  if (path / "checkpoints").is_dir():
    return True
  try:
    return "optimizer" in json.loads((path / "config.json").read_text())
  except (OSError, ValueError, TypeError):
    return False


def _run_model_config(path: Path, run_config: dict[str, Any]) -> qwen.QwenConfig:
  stored = path / "model.json"
  if stored.is_file():
    return qwen.QwenConfig(**json.loads(stored.read_text()))
  overrides = dict(run_config.get("model_overrides") or {},
                   compute_dtype=run_config.get("compute_dtype", "float32"))
  if run_config.get("init_from"):
    from sophia_lambda_jax.models import hf

    return hf.config_from_hf(hf.read_config(run_config["init_from"]), **overrides)
  return qwen.get_config(run_config["model"], **overrides)


def _run_compact_vocab(path: Path, run_config: dict[str, Any], vocab_size: int):
  from sophia_lambda_jax import data

  if vocab_size >= data.QWEN_VOCAB_SIZE:
    return None
  stored = path / data.COMPACT_VOCAB_FILE
  if stored.is_file():
    vocab = data.CompactVocab.load(stored)
  else:  # a run from before the table was stored: rank it again from its data folder
    data_dir = data.resolve_data(run_config["data"])
    counts = np.load(data_dir / data.load_manifest(data_dir)["counts"])
    vocab = data.CompactVocab.from_counts(counts, vocab_size)
  if vocab.size != vocab_size:
    raise ValueError(f"{stored} holds a {vocab.size}-id table; the model has {vocab_size} ids")
  return vocab


def _load_run(path: Path, compute_dtype: str | None) -> Loaded:
  from sophia_lambda_jax.train import checkpoint

  config_file = path / "config.json"
  if not config_file.is_file():
    raise FileNotFoundError(f"{config_file} not found: {path} is not a complete run directory")
  run_config = json.loads(config_file.read_text())
  config = _run_model_config(path, run_config)
  if compute_dtype is not None:
    config = dataclasses.replace(config, compute_dtype=compute_dtype)
  if checkpoint.latest_step(path / "checkpoints") is None:
    raise FileNotFoundError(f"run directory {path} has no complete checkpoint in "
                            f"{path / 'checkpoints'} (train it first: slj train --out {path})")
  abstract = nnx.eval_shape(lambda: qwen.Qwen(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  step, params = checkpoint.restore_params(path / "checkpoints",
                                           nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
  nnx.replace_by_pure_dict(state, params)
  model = nnx.merge(graphdef, state)
  tokenizer = VocabTokenizer(config.vocab_size,
                             _run_compact_vocab(path, run_config, config.vocab_size))
  return Loaded(model, tokenizer, step, run_config)


def load(path, compute_dtype: str | None = None) -> Loaded:
  """The model of a run directory's newest complete checkpoint, or of a HuggingFace Qwen2
  directory, with its tokenizer.

  Args:
    path: a run directory (`slj train --out`, has `checkpoints/`) or a HuggingFace Qwen2
      directory (config.json + *.safetensors).
    compute_dtype: "float32" or "bfloat16"; None keeps the run's (float32 for HuggingFace).

  Raises FileNotFoundError / ValueError with one line naming the path: no such directory,
  a run without a checkpoint, a HuggingFace directory of another architecture.
  """
  path = Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"{path} is not a directory (expected a run directory or a "
                            f"HuggingFace Qwen2 directory)")
  if is_run_directory(path):
    return _load_run(path, compute_dtype)
  from sophia_lambda_jax.models import hf

  if not (path / "config.json").is_file():
    raise FileNotFoundError(f"{path} has neither checkpoints/ (a run directory) nor "
                            f"config.json (a HuggingFace directory)")
  overrides = {} if compute_dtype is None else {"compute_dtype": compute_dtype}
  model = hf.from_hf(path, **overrides)
  return Loaded(model, VocabTokenizer(model.config.vocab_size), None, None)


# ----------------------------------------------------------------------------- evaluate


@jax.jit
def _batch_loss(graphdef_and_state, rows):
  graphdef, state = graphdef_and_state
  logits = nnx.merge(graphdef, state)(rows[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, rows[:, 1:]).mean()


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
