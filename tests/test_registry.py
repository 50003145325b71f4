"""The optimizer registry is the one place an optimizer is declared: a toy optimizer
registered here trains through `slj train` and appears in `slj compare`'s tables."""

import json

import optax
import pytest

import sophia_lambda_jax as slj
from sophia_lambda_jax import cli, optimizers
from sophia_lambda_jax.compare import protocols, runner


def sign_descent(learning_rate=1e-3, weight_decay: float = 0.0):
  """theta -= lr * (sign(g) + wd * theta): a toy optimizer for the registry test."""
  return optax.chain(optax.scale_by_sign(), optax.add_decayed_weights(weight_decay),
                     optax.scale_by_learning_rate(learning_rate))


@pytest.fixture
def toy_optimizer():
  spec = slj.register(optimizers.OptimizerSpec(
      "sign_descent", sign_descent, "Sign descent", "test", 1e-3, aliases=("signsgd",)))
  yield spec
  slj.unregister("sign_descent")
  assert "sign_descent" not in slj.OPTIMIZERS


def _tiny_fields():
  return ["--set", "model=qwen-tiny", "--set", "batch_size=2", "--set", "seq_len=16",
          "--set", "eval_batches=1", "--set", "warmup_steps=1", "--set", "tensorboard=false"]


def test_a_registered_optimizer_trains_and_is_tabled(tmp_path, toy_optimizer, capsys):
  assert slj.resolve("signsgd") is toy_optimizer
  assert "weight_decay" in slj.train.config.optimizer_hyperparameters()
  assert protocols.check_optimizers(["signsgd"]) == ("sign_descent",)

  run = tmp_path / "train"
  assert cli.main(["train", "--optimizer", "signsgd", "--model", "qwen-tiny", "--steps", "2",
                   "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1",
                   "--tensorboard", "false", "--weight-decay", "0.01",
                   "--out", str(run)]) == 0
  summary = json.loads((run / "summary.json").read_text())
  assert summary["steps"] == 2 and summary["final_val_loss"] > 0

  out = tmp_path / "cmp"
  assert runner.main(["--protocol", "cpu", "--out", str(out), "--optimizers", "sign_descent",
                      "--steps", "2", "--no-plots", "--no-compile-cache", *_tiny_fields()]) == 0
  assert "| Sign descent |" in (out / "results.md").read_text()
  assert "sign_descent" in json.loads((out / "results.json").read_text())["aggregates"]


def test_register_refuses_taken_names_and_bad_estimators(toy_optimizer):
  with pytest.raises(ValueError, match="'sophia_g' is already registered"):
    slj.register(optimizers.OptimizerSpec("mine", sign_descent, "Mine", "test", 1e-3,
                                          aliases=("sophia_g",)))
  with pytest.raises(ValueError, match="hessian_estimator must be None or one of"):
    slj.register(optimizers.OptimizerSpec("mine", sign_descent, "Mine", "test", 1e-3,
                                          hessian_estimator="exact"))
  assert "mine" not in slj.OPTIMIZERS
  with pytest.raises(ValueError, match="unknown optimizer 'nope'"):
    slj.get_optimizer("nope")
