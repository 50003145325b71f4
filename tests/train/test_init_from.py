"""`slj train --init-from HF_DIR`: the run starts from a transformers-written Qwen2
checkpoint (its step-0 loss is transformers' loss on the same batch) or from the export of a
compact-vocabulary run (the data read through its table), its checkpoints resume it
(`test_train_resume` covers resuming itself); a checkpoint whose vocabulary the data does
not fit is refused in one line."""

import json

import numpy as np
import optax
import pytest
import torch
import transformers

from sophia_lambda_jax import cli, data, runs, train
from sophia_lambda_jax.train.metrics import read_metrics

BATCH, SEQ = 4, 32


def _write_hf(path, vocab_size, seed=0):
  config = transformers.Qwen2Config(
      vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
      num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
      rope_theta=10000.0, tie_word_embeddings=False)
  torch.manual_seed(seed)
  model = transformers.Qwen2ForCausalLM(config).eval()
  with torch.no_grad():  # non-zero biases and norm scales, larger weights than the init
    for name, p in model.named_parameters():
      p.copy_(torch.randn(p.shape) * (0.1 if "norm" not in name else 0.2)
              + (1.0 if "norm" in name else 0.0))
  model.save_pretrained(path, safe_serialization=True)
  return model


def _config(hf_dir, token_data, out, steps):
  return train.TrainConfig(
      init_from=str(hf_dir), optimizer="sophia_lambda", steps=steps, batch_size=BATCH,
      seq_len=SEQ, data=str(token_data), out=str(out), mesh="data=1,fsdp=1", eval_every=0,
      checkpoint_every=1, keep_checkpoints=3, compute_dtype="float32", tensorboard=False,
      log_every=1)


def test_init_from_starts_at_transformers_loss(token_data, tmp_path):
  hf_dir = tmp_path / "tiny-qwen2"
  reference = _write_hf(hf_dir, data.QWEN_VOCAB_SIZE)
  out = tmp_path / "run"
  train.run_training(_config(hf_dir, token_data, out, steps=2))
  losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
  assert len(losses) == 2 and np.isfinite(losses).all()

  rows = data.TokenBatches(token_data, "train", BATCH, SEQ, seed=0,
                           vocab_size=data.QWEN_VOCAB_SIZE).batch(0)
  with torch.no_grad():
    logits = reference(torch.tensor(rows[:, :-1], dtype=torch.long)).logits
    expected = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), torch.tensor(rows[:, 1:].reshape(-1),
                                                          dtype=torch.long)).item()
  np.testing.assert_allclose(losses[0], expected, rtol=1e-5)

  # The run resumes from its own checkpoints like any run: another --init-from is refused
  # before anything is built.
  other = _config(tmp_path / "other-qwen2", token_data, out, steps=2)
  with pytest.raises(ValueError, match="refusing to resume(.|\n)*init_from: checkpoint has"):
    train.run_training(other)
  stored = json.loads((out / "model.json").read_text())
  assert stored["vocab_size"] == data.QWEN_VOCAB_SIZE and stored["hidden_size"] == 16
  loaded = runs.load(out)  # the run alone rebuilds the HF architecture
  assert loaded.step == 2 and loaded.model.config.hidden_size == 16
  assert loaded.tokenizer.compact is None and not loaded.model.config.tie_embeddings


@pytest.mark.parametrize("case", ["small vocabulary", "other architecture",
                                  "a training run"])
def test_init_from_refusals_are_one_line(token_data, tmp_path, capsys, case):
  hf_dir = tmp_path / "hf"
  expected = "vocab_size 1000"
  if case == "a training run":  # what `slj train --out` writes, not yet exported
    (hf_dir / "checkpoints").mkdir(parents=True)
    train.TrainConfig(model="qwen-tiny", out=str(hf_dir)).to_json(hf_dir / "config.json")
    expected = f"{hf_dir} is a training run directory, not a HuggingFace one: export it first"
  else:
    _write_hf(hf_dir, vocab_size=1000)
  if case == "other architecture":
    config = json.loads((hf_dir / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (hf_dir / "config.json").write_text(json.dumps(config))
    expected = "expected a Qwen2 causal LM"
  capsys.readouterr()  # transformers' progress bar while saving
  code = cli.main(["train", "--init-from", str(hf_dir), "--data", str(token_data),
                   "--out", str(tmp_path / "run"), "--steps", "1", "--batch-size", "4",
                   "--seq-len", "32", "--mesh", "data=1,fsdp=1"])
  err = capsys.readouterr().err.strip()
  assert code == 1 and len(err.splitlines()) == 1 and expected in err, err


def test_init_from_a_compact_export_reads_the_data_through_its_table(token_data, tmp_path,
                                                                    capsys):
  """The export of a compact-vocabulary run (weights at the compact size beside its
  compact_vocab.npy) starts a run at that model's loss on the data read through the export's
  table (not one ranked again from the new data), the new run keeps the table, and the
  banner names the weights it started from."""
  from flax import nnx

  from sophia_lambda_jax.models import hf, qwen

  counts = np.load(token_data / data.load_manifest(token_data)["counts"])
  compact = data.CompactVocab.from_counts(np.roll(counts, 7), 1024)  # not this data's ranking
  model = qwen.Qwen(qwen.get_config("qwen-tiny", compute_dtype="float32"), rngs=nnx.Rngs(5))
  export = hf.to_hf(model, tmp_path / "export")
  compact.save(export / data.COMPACT_VOCAB_FILE)
  out = tmp_path / "run"
  assert cli.main(["train", "--init-from", str(export), "--data", str(token_data), "--out",
                   str(out), "--optimizer", "adamw", "--steps", "1", "--batch-size", str(BATCH),
                   "--seq-len", str(SEQ), "--mesh", "data=1,fsdp=1", "--eval-every", "0",
                   "--log-every", "1", "--compute-dtype", "float32", "--tensorboard",
                   "false"]) == 0
  printed = capsys.readouterr()
  assert f"from the weights of {export}" in printed.out + printed.err
  rows = data.TokenBatches(token_data, "train", BATCH, SEQ, seed=0, vocab_size=1024,
                           compact_vocab=compact).batch(0)
  logits = model(rows[:, :-1])
  expected = float(optax.softmax_cross_entropy_with_integer_labels(logits, rows[:, 1:]).mean())
  losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
  np.testing.assert_allclose(losses[0], expected, rtol=1e-5)
  np.testing.assert_array_equal(runs.load(out).tokenizer.compact.inverse, compact.inverse)
