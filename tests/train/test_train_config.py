"""TrainConfig: flags, JSON files, derived values and bad input (no compilation)."""

import json

import pytest

from sophia_lambda_jax.train.config import TrainConfig, config_from_argv, parse_mesh


def test_flags_fill_fields_and_optimizer_hyperparameters():
  config = config_from_argv([
      "--model", "qwen-tiny", "--optimizer", "sophia_lambda", "--steps", "7",
      "--batch-size", "12", "--seq-len", "48", "--grad-accum", "3", "--mesh", "data=2,fsdp=4",
      "--opt.rho", "0.03", "--hessian-interval", "20", "--b1=0.9", "--adaptive_interval",
      "false", "--model.num_layers", "3", "--lr", "0.002", "--grad-clip", "null"])
  assert config.model == "qwen-tiny" and config.optimizer == "sophia_lambda"
  assert (config.steps, config.batch_size, config.seq_len, config.grad_accum) == (7, 12, 48, 3)
  assert config.optimizer_kwargs == {"rho": 0.03, "hessian_interval": 20, "b1": 0.9,
                                     "adaptive_interval": False}
  assert config.model_overrides == {"num_layers": 3}
  assert config.learning_rate == 0.002 and config.grad_clip is None
  # batch_tokens is derived from the global batch, never typed.
  assert config.batch_tokens == 12 * 48 and config.micro_batch_size == 4


def test_json_config_file_is_overridden_by_flags(tmp_path):
  path = tmp_path / "run.json"
  path.write_text(json.dumps({"model": "qwen-tiny", "steps": 50, "optimizer": "lion",
                              "optimizer_kwargs": {"b1": 0.95}}))
  config = config_from_argv(["--config", str(path), "--steps", "9", "--opt.b2", "0.98"])
  assert (config.model, config.optimizer, config.steps) == ("qwen-tiny", "lion", 9)
  assert config.optimizer_kwargs == {"b1": 0.95, "b2": 0.98}
  # The written config.json format is the same file format.
  config.to_json(tmp_path / "again.json")
  assert TrainConfig.from_json(tmp_path / "again.json") == config


def test_rho_auto_and_its_target_pass_the_registry_s_validation(tmp_path):
  config = config_from_argv(["--optimizer", "sophia", "--rho", "auto",
                             "--target-unclipped", "0.25"])
  assert config.optimizer_kwargs == {"rho": "auto", "target_unclipped": 0.25}
  json_config = tmp_path / "run.json"
  json_config.write_text(json.dumps({"optimizer": "sophia_h",
                                     "optimizer_kwargs": {"rho": "auto"}}))
  assert config_from_argv(["--config", str(json_config)]).optimizer_kwargs == {"rho": "auto"}
  with pytest.raises(ValueError, match="rho must be a number in .* or 'auto'"):
    TrainConfig(optimizer="sophia", optimizer_kwargs={"rho": "automatic"})
  with pytest.raises(ValueError, match="target_unclipped .* needs rho='auto'"):
    TrainConfig(optimizer="sophia_lambda", optimizer_kwargs={"rho": 0.2,
                                                             "target_unclipped": 0.3})


@pytest.mark.parametrize("values, field", [
    ({"steps": 0}, "steps"),
    ({"batch_size": 10, "grad_accum": 3}, "grad_accum"),
    ({"learning_rate": -1.0}, "learning_rate"),
    ({"learning_rate": float("nan")}, "learning_rate"),
    ({"compute_dtype": "float16"}, "compute_dtype"),
    ({"mesh": "data=2,model=4"}, "mesh"),
    ({"mesh": "data=0"}, "mesh"),
    ({"optimizer_kwargs": {"batch_tokens": 4096}}, "batch_tokens"),
    ({"grad_clip": 0.0}, "grad_clip"),
    ({"final_eval_batches": 0}, "final_eval_batches"),
    ({"schedule": "linear"}, "schedule"),
    ({"schedule": 1}, "schedule"),
    ({"decay_fraction": 0.0}, "decay_fraction"),
    ({"decay_fraction": 1.5}, "decay_fraction"),
    ({"decay_fraction": "x"}, "decay_fraction"),
    ({"schedule": "wsd", "steps": 100, "warmup_steps": 90}, "decay_fraction"),
    ({"not_a_field": 1}, "not_a_field"),
])
def test_bad_values_raise_naming_the_field(values, field):
  with pytest.raises(ValueError, match=field) as error:
    TrainConfig.from_dict(values)
  assert "\n" not in str(error.value)


def test_unknown_flag_and_missing_config_file(tmp_path):
  with pytest.raises(SystemExit):
    config_from_argv(["--not-a-hyperparameter", "3"])
  with pytest.raises(FileNotFoundError, match="nope.json"):
    config_from_argv(["--config", str(tmp_path / "nope.json")])


def test_mesh_spec_and_default_learning_rate():
  assert parse_mesh("data=2,fsdp=4") == {"data": 2, "fsdp": 4}
  assert parse_mesh("fsdp=8") == {"data": 1, "fsdp": 8}
  assert parse_mesh("auto") is None
  config = TrainConfig(optimizer="lion")
  # 1/width scaling of the per-optimizer base rate.
  assert config.resolved_learning_rate(256) == pytest.approx(
      config.resolved_learning_rate(128) / 2)
  assert TrainConfig(learning_rate=0.01).resolved_learning_rate(4096) == 0.01
  assert TrainConfig(steps=100).resolved_warmup_steps() == 10


def test_final_eval_batches_is_part_of_the_results():
  from sophia_lambda_jax.train.config import result_differences

  assert config_from_argv(["--final-eval-batches", "null"]).final_eval_batches is None
  assert config_from_argv(["--final-eval-batches", "20"]).final_eval_batches == 20
  planned = TrainConfig(final_eval_batches=8)
  # A run directory written before the field existed ended with an eval_batches evaluation.
  assert result_differences({"eval_batches": 8}, planned) == []
  assert result_differences({"eval_batches": 8}, TrainConfig()) == [
      "final_eval_batches: 8 there, None planned"]
  assert result_differences({"eval_batches": 8, "final_eval_batches": None}, planned) == [
      "final_eval_batches: None there, 8 planned"]


def test_schedule_is_part_of_what_a_resume_and_the_results_must_match():
  from sophia_lambda_jax.train import checkpoint
  from sophia_lambda_jax.train.config import (RESULTS_DEPEND_ON, RESUME_MUST_MATCH,
                                              result_differences)

  assert {"schedule", "decay_fraction"} <= set(RESUME_MUST_MATCH) <= set(RESULTS_DEPEND_ON)
  assert config_from_argv(["--schedule", "wsd", "--decay-fraction", "0.3"]).decay_fraction == 0.3
  wsd = TrainConfig(schedule="wsd").to_dict()
  cosine = TrainConfig().to_dict()
  assert checkpoint.config_differences(cosine, wsd) == [
      "schedule: checkpoint has 'cosine', this run has 'wsd'"]
  assert result_differences(cosine, TrainConfig(schedule="constant")) == [
      "schedule: 'cosine' there, 'constant' planned"]
  # A config written before the fields existed is a cosine run: it resumes and matches as one.
  old = {k: v for k, v in cosine.items() if k not in ("schedule", "decay_fraction")}
  assert checkpoint.config_differences(old, cosine) == []
  assert checkpoint.config_differences(old, wsd) == [
      "schedule: checkpoint has 'cosine', this run has 'wsd'"]
  assert result_differences(old, TrainConfig()) == []
  assert TrainConfig.from_dict(old).schedule == "cosine"


def test_the_resolved_optimizer_carries_the_estimator_and_its_batch_tokens():
  gnb = TrainConfig(optimizer="sophia_g", batch_size=4, seq_len=8).validate()
  assert (gnb.name, gnb.estimator, gnb.kwargs) == ("sophia", "gnb", {"batch_tokens": 32})
  # Hutchinson's estimate is the Hessian of the mean loss: B = 1, as in Sophia-H.
  hutch = TrainConfig(optimizer="sophia", hessian_estimator="hutchinson",
                      optimizer_kwargs={"rho": 0.02}).validate()
  assert hutch.estimator == "hutchinson" and hutch.kwargs == {"rho": 0.02, "batch_tokens": 1}
  assert hutch.hyperparameter("rho") == 0.02
  sophia_h = TrainConfig(optimizer="sophia_h").validate()
  assert sophia_h.kwargs == {} and sophia_h.hyperparameter("rho") == 0.01
  adamw = TrainConfig(optimizer="adamw").validate()
  assert adamw.estimator is None and adamw.kwargs == {}
  assert adamw.peak_learning_rate(256) == pytest.approx(adamw.spec.base_learning_rate / 2)
  # The config validates the kwargs the loop builds with: a bad one is refused up front.
  with pytest.raises(ValueError, match="optimizer_kwargs: unknown hyperparameter"):
    TrainConfig(optimizer="adamw", optimizer_kwargs={"rho": 0.1})
