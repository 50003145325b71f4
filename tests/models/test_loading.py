"""models.load_hf: the model of a HuggingFace Qwen2 directory with the Qwen2 tokenizer."""

import jax
import numpy as np
import pytest
from flax import nnx

from sophia_lambda_jax import models
from sophia_lambda_jax.models import hf, qwen


def test_load_hf_gives_the_model_and_the_qwen2_tokenizer(tmp_path):
  config = qwen.get_config("qwen-tiny", vocab_size=151936 + 128)
  model = qwen.Qwen(config, rngs=nnx.Rngs(3))
  hf.to_hf(model, tmp_path / "hf")
  loaded = models.load_hf(tmp_path / "hf")
  assert loaded.step is None and loaded.run_config is None
  assert loaded.tokenizer.compact is None and loaded.tokenizer.vocab_size == 151936 + 128
  ours, theirs = (nnx.to_pure_dict(nnx.state(m, nnx.Param)) for m in (loaded.model, model))
  for x, y in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert loaded.tokenizer.decode(loaded.tokenizer.encode("Grüße")) == "Grüße"
  assert models.load_hf(tmp_path / "hf", "bfloat16").model.config.compute_dtype == "bfloat16"
  with pytest.raises(FileNotFoundError, match="config.json not found"):
    models.load_hf(tmp_path)
