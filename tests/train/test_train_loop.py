"""train/loop.py: `run_training` resolves the config's optimizer once and every part of the
run (validation, the program, the summary's warning) uses that one resolution."""

from sophia_lambda_jax import optimizers
from sophia_lambda_jax.train import TrainConfig, run_training


def test_run_training_resolves_the_optimizer_once(token_data, tmp_path, monkeypatch, capsys):
  config = TrainConfig(model="qwen-tiny", data=str(token_data), steps=2, batch_size=2,
                       seq_len=16, eval_batches=1, tensorboard=False, out=str(tmp_path),
                       optimizer="sophia_g", hessian_estimator="hutchinson",
                       optimizer_kwargs={"rho": 1e-4, "hessian_interval": 1},
                       compute_dtype="float32")
  calls = []
  real = optimizers.resolve

  def counting(name):
    calls.append(name)
    return real(name)

  monkeypatch.setattr(optimizers, "resolve", counting)
  summary = run_training(config)
  assert calls == ["sophia_g"]
  assert summary["unclipped_in_band"] is False
  # The out-of-band warning reads rho from the same resolved optimizer.
  assert "rho 0.0001 is fixed" in capsys.readouterr().err
