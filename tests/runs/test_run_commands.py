"""`slj generate`, `slj eval`, `slj export` through the CLI's main: output, and bad input
as one line on stderr with exit status 2."""

import json
import shutil

import numpy as np
import pytest

from sophia_lambda_jax import cli, data, train


def _one_line_error(capsys, argv, expected):
  code = cli.main(argv)
  err = capsys.readouterr().err.strip()
  assert code == 2, err
  assert len(err.splitlines()) == 1 and expected in err, err
  return err


@pytest.fixture
def run_without_checkpoint(tmp_path):
  run = tmp_path / "run"
  (run / "checkpoints").mkdir(parents=True)
  train.TrainConfig(model="qwen-tiny", out=str(run)).to_json(run / "config.json")
  return run


@pytest.mark.parametrize("command", ["generate", "eval", "export"])
def test_run_without_checkpoint(capsys, run_without_checkpoint, tmp_path, command):
  argv = {"generate": ["--prompt", "hi"], "eval": [], "export": [str(tmp_path / "out")]}
  _one_line_error(capsys, [command, str(run_without_checkpoint)] + argv[command],
                  "has no complete checkpoint")


def test_hf_directory_of_another_architecture(capsys, tmp_path):
  (tmp_path / "llama").mkdir()
  (tmp_path / "llama" / "config.json").write_text(json.dumps(
      {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 10}))
  _one_line_error(capsys, ["generate", str(tmp_path / "llama"), "--prompt", "hi"],
                  "expected a Qwen2 causal LM")
  _one_line_error(capsys, ["eval", str(tmp_path / "llama"), "--data", "builtin"],
                  "expected a Qwen2 causal LM")


def test_prompt_longer_than_the_context(capsys, compact_run):
  _one_line_error(capsys, ["generate", str(compact_run), "--prompt", "the fox " * 200],
                  "exceeds the model's context of 256 tokens")


def test_eval_of_a_hf_directory_needs_data(capsys, tmp_path):
  (tmp_path / "hf").mkdir()
  _one_line_error(capsys, ["eval", str(tmp_path / "hf")], "pass --data DIR")


@pytest.mark.parametrize("flag", ["--batches", "--batch-size", "--seq-len"])
def test_eval_refuses_zero_instead_of_taking_the_default(capsys, compact_run, flag):
  _one_line_error(capsys, ["eval", str(compact_run), flag, "0"],
                  f"{flag} must be a positive integer, got 0")


def test_eval_prints_loss_perplexity_and_tokens(capsys, compact_run):
  assert cli.main(["eval", str(compact_run), "--batches", "2"]) == 0
  result = json.loads(capsys.readouterr().out)
  summary = json.loads((compact_run / "summary.json").read_text())
  assert result["tokens"] == 2 * 4 * 32 and result["batches"] == 2
  np.testing.assert_allclose(result["loss"], summary["final_val_loss"], rtol=1e-5)
  np.testing.assert_allclose(result["perplexity"], np.exp(result["loss"]), rtol=1e-9)


def test_generate_samples_with_top_p_and_seed(capsys, compact_run):
  outputs = []
  for seed in (0, 0, 1):
    assert cli.main(["generate", str(compact_run), "--prompt", "the lazy", "--temperature",
                     "1.0", "--top-p", "0.9", "--seed", str(seed), "--max-new-tokens",
                     "16"]) == 0
    outputs.append(capsys.readouterr().out)
  assert outputs[0] == outputs[1] and outputs[0] != outputs[2]
  # Six steps on a corpus of 30 words already put some of them into the samples.
  corpus_words = set("the quick brown fox jumps over a lazy dog while seven birds sing in "
                     "tall trees and rivers flow down to the sea under grey clouds at "
                     "night".split())
  assert set(outputs[0].split()) & corpus_words


def test_generate_and_eval_a_hf_directory(capsys, tmp_path, corpus):
  from flax import nnx

  from sophia_lambda_jax import data, runs
  from sophia_lambda_jax.models import hf, qwen, sampler

  model = qwen.Qwen(qwen.get_config("qwen-tiny", vocab_size=data.QWEN_VOCAB_SIZE),
                    rngs=nnx.Rngs(4))
  hf.to_hf(model, tmp_path / "hf")
  assert cli.main(["generate", str(tmp_path / "hf"), "--prompt", "the sea",
                   "--max-new-tokens", "5"]) == 0
  loaded = runs.load(tmp_path / "hf")
  expected = sampler.continuation(loaded.model, loaded.tokenizer, "the sea", 5)[2]
  assert capsys.readouterr().out == expected + "\n"
  assert cli.main(["eval", str(tmp_path / "hf"), "--data", str(corpus), "--batches", "1",
                   "--batch-size", "2", "--seq-len", "16"]) == 0
  result = json.loads(capsys.readouterr().out)
  # An untrained model is close to uniform over the vocabulary.
  assert result["tokens"] == 32 and abs(result["loss"] - np.log(data.QWEN_VOCAB_SIZE)) < 0.5


def test_eval_defaults_to_the_runs_own_final_evaluation(capsys, compact_run, tmp_path):
  assert cli.main(["eval", str(compact_run)]) == 0
  result = json.loads(capsys.readouterr().out)
  summary = json.loads((compact_run / "summary.json").read_text())
  assert result["batches"] == summary["final_val_batches"] == 2
  np.testing.assert_allclose(result["loss"], summary["final_val_loss"], rtol=1e-5)
  # final_eval_batches null: the whole validation split.
  whole = tmp_path / "whole"
  shutil.copytree(compact_run, whole)
  config = json.loads((whole / "config.json").read_text())
  (whole / "config.json").write_text(json.dumps(dict(config, final_eval_batches=None)))
  assert cli.main(["eval", str(whole)]) == 0
  split = data.TokenBatches(config["data"], "val", 4, 32, vocab_size=1024).num_batches
  assert json.loads(capsys.readouterr().out)["batches"] == split > 2
