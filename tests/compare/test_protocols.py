"""Protocol definitions: every spec is a valid TrainConfig and each protocol keeps the
promises of docs/design.md section 8 (same token budget, same hyperparameters, sweep shape)."""

import json
import math
from pathlib import Path

import pytest

import sophia_lambda_jax as slj
from sophia_lambda_jax.compare import protocols
from sophia_lambda_jax.train import TrainConfig


def _tokens(spec):
  f = spec.fields
  return f["steps"] * f["batch_size"] * f["seq_len"]


ALL = tuple(slj.OPTIMIZERS)
REPO = Path(__file__).resolve().parents[2]


def test_compared_optimizers_are_the_library_s():
  assert protocols.check_optimizers(None) == ALL
  assert len(ALL) == 8
  assert protocols.check_optimizers(["sophia_g", "adamw"]) == ("sophia", "adamw")
  with pytest.raises(ValueError, match="unknown optimizer 'bogus'"):
    protocols.check_optimizers(["bogus"])


@pytest.mark.parametrize("name", sorted(protocols.PROTOCOLS))
def test_every_spec_builds_a_train_config(name, tmp_path):
  specs = protocols.get_protocol(name)()
  assert specs
  run_names = [s.run_name for s in specs]
  assert len(set(run_names)) == len(run_names)
  for spec in specs:
    config = spec.train_config(tmp_path / spec.run_name)
    assert isinstance(config, TrainConfig)
    assert config.optimizer == spec.optimizer and config.seed == spec.seed
    assert config.out == str(tmp_path / spec.run_name)


@pytest.mark.parametrize("name", sorted(protocols.PROTOCOLS))
def test_optimizer_kwargs_are_accepted_by_every_optimizer(name):
  for spec in protocols.get_protocol(name)():
    kwargs = dict(spec.fields["optimizer_kwargs"])
    if spec.optimizer in ("sophia", "sophia_lambda"):
      kwargs["batch_tokens"] = spec.fields["batch_size"] * spec.fields["seq_len"]
    slj.get_optimizer(spec.optimizer, learning_rate=spec.fields["learning_rate"] or 1e-3,
                      **kwargs)


def test_cpu_protocol_is_qwen_cpu_on_builtin_at_one_token_budget():
  specs = protocols.cpu()
  assert [s.optimizer for s in specs] == list(ALL)
  assert {s.seed for s in specs} == {0}
  assert {s.fields["model"] for s in specs} == {"qwen-cpu"}
  assert {s.fields["data"] for s in specs} == {"builtin"}
  assert len({_tokens(s) for s in specs}) == 1
  assert all(s.fields["learning_rate"] is None for s in specs)  # each its own default


def test_seeds_multiply_runs_and_name_directories():
  specs = protocols.cpu(seeds=3)
  assert len(specs) == 24
  assert {s.run_name for s in specs if s.optimizer == "lion"} == {
      "lion/seed0", "lion/seed1", "lion/seed2"}


@pytest.mark.parametrize("name", ["paper", "paper-short"])
def test_paper_protocols_use_the_papers_hyperparameters_for_everyone(name):
  specs = protocols.get_protocol(name)()
  assert [s.optimizer for s in specs] == list(ALL)
  for s in specs:
    assert s.fields["model"] == "qwen-134m"
    assert s.fields["seq_len"] == 2048
    assert s.fields["learning_rate"] == 3e-4
    # The papers' fixed rho 0.04 for the GNB pair (Sophia-Lambda's default is "auto").
    rho = {"rho": 0.04} if s.optimizer in ("sophia", "sophia_lambda") else {}
    assert s.fields["optimizer_kwargs"] == {"b1": 0.9, "b2": 0.95, "weight_decay": 0.1, **rho}
    assert s.fields["batch_size"] % s.fields["grad_accum"] == 0
  assert len({_tokens(s) for s in specs}) == 1


def test_paper_is_the_lavsm_setting_and_short_is_smaller():
  full, short = protocols.paper()[0], protocols.paper_short()[0]
  assert (full.fields["batch_size"], full.fields["steps"]) == (512, 50_000)
  assert _tokens(short) < _tokens(full) / 100
  # Both take the micro-batch docs/memory.md measured to fit an 80 GB GPU: 32 x 2048.
  for spec in (full, short):
    assert spec.fields["batch_size"] // spec.fields["grad_accum"] == 32


def test_tuned_sweep_is_log_spaced_around_each_default():
  specs = protocols.tuned_sweep()
  for opt in ALL:
    lrs = sorted({s.fields["learning_rate"] for s in specs if s.optimizer == opt})
    assert len(lrs) >= 4
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]
    assert all(math.isclose(r, ratios[0], rel_tol=1e-4) for r in ratios)
    centre = protocols.default_learning_rate(opt)
    assert lrs[0] < centre < lrs[-1]
    assert math.isclose(math.exp(sum(map(math.log, lrs)) / len(lrs)), centre, rel_tol=1e-4)
  assert {s.seed for s in specs} == {0} and {s.phase for s in specs} == {"sweep"}


def test_tuned_sweeps_rho_with_the_learning_rate_for_the_sophia_family():
  specs = protocols.tuned_sweep(["sophia_lambda", "adamw"])
  sl = [s for s in specs if s.optimizer == "sophia_lambda"]
  rho = protocols.CPU_REGIME_KWARGS["sophia_lambda"]["rho"]
  assert len(sl) == len(protocols.SWEEP_FACTORS) * len(protocols.TUNED_RHO_FACTORS)
  assert sorted({s.fields["optimizer_kwargs"]["rho"] for s in sl}) == pytest.approx(
      [rho * f for f in protocols.TUNED_RHO_FACTORS])
  assert len({s.run_name for s in sl}) == len(sl)
  assert all("rho" not in s.fields["optimizer_kwargs"] for s in specs if s.optimizer == "adamw")


def test_tuned_final_reports_seeds_other_than_the_sweep_s():
  sweep = protocols.tuned_sweep(["sophia"])
  chosen = {"learning_rate": sweep[4].fields["learning_rate"],
            "optimizer_kwargs": {k: sweep[4].fields["optimizer_kwargs"][k]
                                 for k in ("rho", "bias_correction")}}
  final = protocols.tuned_final({"sophia": chosen}, seeds=3)
  assert [s.seed for s in final] == [1, 2, 3] and {s.seed for s in sweep} == {0}
  assert {s.label for s in final} == {sweep[4].label}
  assert all(s.fields == sweep[4].fields and s.phase == "final" for s in final)


def test_tuned_adds_the_final_runs_once_the_sweep_has_ended():
  sweep = protocols.tuned_sweep(["adamw", "lion"])
  assert protocols.tuned(3, ["adamw", "lion"]) == sweep
  losses = {s.run_name: 5.0 - 0.1 * i for i, s in enumerate(sweep)}
  unfinished = sweep[-1].run_name
  partial = protocols.tuned(
      3, ["adamw", "lion"],
      outcome=lambda s: None if s.run_name == unfinished else (losses[s.run_name], None))
  assert partial == sweep
  done = protocols.tuned(3, ["adamw", "lion"], outcome=lambda s: (losses[s.run_name], None))
  assert done[:len(sweep)] == sweep
  assert [(s.label, s.seed) for s in done[len(sweep):]] == [
      (sweep[4].label, 1), (sweep[4].label, 2), (sweep[4].label, 3),
      (sweep[-1].label, 1), (sweep[-1].label, 2), (sweep[-1].label, 3)]


def test_best_settings_ignore_diverged_runs_and_prefer_the_band():
  sweep = protocols.tuned_sweep(["adamw", "lion", "sophia"])
  losses = {s.run_name: float(i) for i, s in enumerate(sweep)}
  losses[sweep[0].run_name] = float("nan")
  sophia = [s for s in sweep if s.optimizer == "sophia"]
  # The loss-best Sophia run is out of band (2 % unclipped); the next one is in band.
  unclipped = {s.run_name: 0.02 if s is sophia[0] else 0.3 for s in sophia}
  best = protocols.best_settings(
      sweep, lambda s: (losses[s.run_name], unclipped.get(s.run_name)))
  assert best["adamw"]["learning_rate"] == sweep[1].fields["learning_rate"]
  lion = [s for s in sweep if s.optimizer == "lion"]
  assert best["lion"]["learning_rate"] == lion[0].fields["learning_rate"]
  assert best["sophia"]["in_band"] and best["sophia"]["val_loss"] == losses[sophia[1].run_name]
  assert best["sophia"]["unconstrained"]["val_loss"] == losses[sophia[0].run_name]
  # No setting in band: the loss-best one, flagged.
  none_in_band = protocols.best_settings(sophia, lambda s: (losses[s.run_name], 0.01))
  assert none_in_band["sophia"]["in_band"] is False
  with pytest.raises(ValueError, match="lion"):
    protocols.best_settings(sweep, lambda s: (None if s.optimizer == "lion" else 1.0, None))


def test_cpu_protocol_fields_are_pinned():
  """Committed results (docs/results/compare-cpu) were produced with these settings."""
  specs = {s.optimizer: s for s in protocols.cpu()}
  f = specs["adamw"].fields
  assert (f["model"], f["data"], f["steps"], f["batch_size"], f["seq_len"],
          f["warmup_steps"], f["eval_every"], f["eval_batches"], f["compute_dtype"]) == (
              "qwen-cpu", "builtin", 120, 8, 128, 12, 30, 8, "float32")
  assert {o: s.fields["optimizer_kwargs"] for o, s in specs.items() if s.fields[
      "optimizer_kwargs"]} == {
          "sophia": {"rho": 0.2, "bias_correction": True},
          "sophia_h": {"rho": 0.05, "bias_correction": True},
          "sophia_lambda": {"rho": 0.2, "bias_correction": True}}


def test_cpu_long_protocol_fields_are_pinned():
  """Committed results (docs/results/cpu-long) were produced with these settings."""
  specs = protocols.cpu_long()
  assert len(specs) == 21 and {s.seed for s in specs} == {0, 1, 2}
  by_label = {s.label: s for s in specs}
  assert list(by_label) == ["adamw", "sophia", "sophia/rho0.2", "sophia_lambda",
                            "sophia_lambda/rho0.2", "lavsm", "lamvs"]
  for opt in ("sophia", "sophia_lambda"):
    lower = by_label[f"{opt}/rho0.2"].fields
    assert lower["optimizer_kwargs"] == {"rho": 0.2, "bias_correction": True}
    assert dict(lower, optimizer_kwargs=None) == dict(by_label[opt].fields,
                                                      optimizer_kwargs=None)
  by_opt = {s.optimizer: s for s in specs if s.label == s.optimizer}
  f = by_opt["adamw"].fields
  assert (f["model"], f["data"], f["steps"], f["batch_size"], f["seq_len"],
          f["warmup_steps"], f["eval_every"], f["eval_batches"], f["compute_dtype"]) == (
              "qwen-cpu", "builtin", protocols.CPU_LONG_STEPS, 8, 128,
              protocols.CPU_LONG_STEPS // 10, 100, 8, "float32")
  assert protocols.CPU_LONG_STEPS == 3000
  assert {o: (s.fields["learning_rate"], s.fields["optimizer_kwargs"])
          for o, s in by_opt.items()} == {
              "adamw": (1.5e-3, {}), "sophia": (1e-3, {"rho": 0.4, "bias_correction": True}),
              "sophia_lambda": (1e-3, {"rho": 0.4, "bias_correction": True}),
              "lavsm": (3e-3, {}), "lamvs": (3e-3, {})}
  # Only the run length differs from the cpu setting.
  cpu = protocols.cpu_fields()
  same = {k for k in cpu if k not in ("steps", "warmup_steps", "eval_every",
                                      "checkpoint_every", "log_every", "learning_rate",
                                      "optimizer_kwargs")}
  assert {k: f[k] for k in same} == {k: cpu[k] for k in same}


def test_cpu_long_runs_the_tuned_protocol_s_choices():
  # Every optimizer's tuned learning rate, and for the Sophia family the tuned rho among the
  # rhos it runs at (its main rho, the first measurement's choice, or CPU_LONG_LOWER_RHO).
  results = json.loads((REPO / "docs/results/tuned-cpu/results.json").read_text())
  runs: dict[str, list[tuple[float, dict]]] = {}
  for spec in protocols.cpu_long(1):
    runs.setdefault(spec.optimizer, []).append(
        (spec.fields["learning_rate"], spec.fields["optimizer_kwargs"]))
  assert set(runs) == set(protocols.CPU_LONG_SETTINGS)
  for opt, configurations in runs.items():
    chosen = results["best_settings"][opt]
    assert (chosen["learning_rate"], chosen["optimizer_kwargs"]) in configurations, opt


def test_cpu_long_refuses_optimizers_it_has_no_setting_for():
  with pytest.raises(ValueError, match=r"cpu-long has tuned settings only for .*'lion'"):
    protocols.cpu_long(optimizers=["adamw", "lion"])
  assert [s.label for s in protocols.cpu_long(1, ["sophia_g"])] == ["sophia", "sophia/rho0.2"]


def test_cpu_long_steps_override_rescales_warmup_and_checkpoints():
  f = protocols.cpu_long(1, ["adamw"], steps=200)[0].fields
  assert (f["steps"], f["warmup_steps"], f["checkpoint_every"], f["eval_every"]) == (
      200, 20, 20, 100)


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_bad_seed_counts_are_refused(bad):
  with pytest.raises(ValueError, match="seeds"):
    protocols.cpu(seeds=bad)


def test_unknown_optimizer_and_protocol_are_refused():
  with pytest.raises(ValueError, match="optimizers"):
    protocols.cpu(optimizers=["adam"])
  with pytest.raises(ValueError, match="protocol"):
    protocols.get_protocol("gpu")


def test_unknown_train_config_field_is_named(tmp_path):
  spec = protocols.cpu(optimizers=["adamw"], no_such_field=1)[0]
  with pytest.raises(ValueError, match="no_such_field"):
    spec.train_config(tmp_path)


def test_rho_auto_can_be_set_for_every_run():
  """`slj compare --set 'optimizer_kwargs={"rho": "auto"}'` replaces the calibrated rho."""
  specs = protocols.cpu(1, ["sophia", "sophia_lambda"], optimizer_kwargs={"rho": "auto"})
  assert [s.fields["optimizer_kwargs"] for s in specs] == [
      {"rho": "auto", "bias_correction": True}] * 2
  for spec in specs:
    spec.train_config("unused")  # validated like any other value


def test_spec_json_round_trip():
  for spec in protocols.cpu(2, ["sophia"]):
    assert protocols.RunSpec.from_json(spec.to_json())._replace(group=spec.group) == spec


def _rates(specs, optimizer):
  return [s.fields["learning_rate"] for s in specs
          if s.optimizer == optimizer and s.phase == "sweep"
          and "b2" not in s.fields["optimizer_kwargs"]]


def test_cpu_long_tuned_starts_with_five_rates_around_the_tuned_choice_on_seed_100():
  specs = protocols.cpu_long_tuned()
  assert {s.seed for s in specs} == {protocols.CPU_LONG_TUNED_SELECTION_SEED} == {100}
  assert {s.phase for s in specs} == {"sweep"}
  for opt, centre in protocols.CPU_LONG_TUNED_CENTRES.items():
    assert _rates(specs, opt) == pytest.approx([centre * f for f in (0.25, 0.5, 1, 2, 4)])
  by_opt = {s.optimizer: s for s in specs}
  for opt in ("sophia", "sophia_h", "sophia_lambda"):
    assert by_opt[opt].fields["optimizer_kwargs"] == {"rho": "auto", "bias_correction": True}
  assert by_opt["adamw"].fields["optimizer_kwargs"] == {}


def test_cpu_long_tuned_protocol_fields_are_pinned():
  """The cpu-long setting, evaluated on the whole validation split at the end."""
  f = protocols.cpu_long_tuned(optimizers=["adamw"])[0].fields
  assert (f["model"], f["data"], f["steps"], f["batch_size"], f["seq_len"],
          f["warmup_steps"], f["eval_every"], f["eval_batches"], f["final_eval_batches"],
          f["compute_dtype"]) == (
              "qwen-cpu", "builtin", 3000, 8, 128, 300, 100, 8, None, "float32")
  long = protocols.cpu_long(1, ["adamw"])[0].fields
  same = set(long) - {"learning_rate", "optimizer_kwargs", "final_eval_batches"}
  assert {k: f[k] for k in same} == {k: long[k] for k in same}


def test_cpu_long_tuned_centres_are_the_tuned_protocol_s_choices():
  results = json.loads((REPO / "docs/results/tuned-cpu/results.json").read_text())
  assert protocols.CPU_LONG_TUNED_CENTRES == {
      opt: chosen["learning_rate"] for opt, chosen in results["best_settings"].items()}


def _outcome_from(loss_of_rate, unfinished=()):
  def outcome(spec):
    if spec.run_name in unfinished:
      return None
    lr = spec.fields["learning_rate"]
    loss = loss_of_rate(spec.optimizer, lr)
    if "b2" in spec.fields["optimizer_kwargs"]:
      loss -= 0.01  # b2 0.99 is a little better
    return loss, 0.3 if spec.optimizer.startswith("sophia") else None
  return outcome


def test_cpu_long_tuned_extends_a_sweep_whose_best_rate_is_at_an_end():
  # Lion's loss falls with the rate up to 2e-2 (beyond its first five rates, 3e-4..4.8e-3);
  # AdamW's is lowest inside its sweep.
  def loss(opt, lr):
    best = 2e-2 if opt == "lion" else 1e-3
    return 4.0 + abs(math.log2(lr / best))

  outcome = _outcome_from(loss)
  specs = protocols.cpu_long_tuned(3, ["adamw", "lion"], outcome=outcome)
  assert _rates(specs, "lion") == pytest.approx([3e-4, 6e-4, 1.2e-3, 2.4e-3, 4.8e-3, 9.6e-3,
                                                 1.92e-2, 3.84e-2])
  assert protocols.cpu_long_tuned_extensions(specs) == {"lion": pytest.approx(
      [9.6e-3, 1.92e-2, 3.84e-2])}
  # AdamW: five rates, then b2 0.99 at its best rate (7.5e-4), which wins.
  adamw = [s for s in specs if s.optimizer == "adamw" and s.phase == "sweep"]
  assert [s.fields["optimizer_kwargs"] for s in adamw] == [{}] * 5 + [{"b2": 0.99}]
  assert adamw[-1].fields["learning_rate"] == 7.5e-4
  finals = [s for s in specs if s.phase == "final"]
  assert [(s.label, s.seed) for s in finals] == [
      ("adamw/lr7.500e-04/b20.99", 0), ("adamw/lr7.500e-04/b20.99", 1),
      ("adamw/lr7.500e-04/b20.99", 2), ("lion/lr1.920e-02", 0), ("lion/lr1.920e-02", 1),
      ("lion/lr1.920e-02", 2)]
  assert all(s.fields["optimizer_kwargs"] == {"b2": 0.99} for s in finals[:3])
  assert {s.seed for s in specs if s.phase == "sweep"} == {100}
  chosen = protocols.chosen_settings(specs, outcome)
  assert chosen["adamw"]["optimizer_kwargs"] == {"b2": 0.99}
  assert chosen["lion"]["learning_rate"] == pytest.approx(1.92e-2)


def test_cpu_long_tuned_waits_for_unfinished_selection_runs():
  def loss(opt, lr):
    return 4.0 + abs(math.log2(lr / 1e-3))

  first = protocols.cpu_long_tuned(3, ["adamw"])
  unfinished = {first[2].run_name}
  specs = protocols.cpu_long_tuned(3, ["adamw"], outcome=_outcome_from(loss, unfinished))
  assert specs == first
  # The extension limit: a loss that keeps falling stops after three more rates.
  specs = protocols.cpu_long_tuned(3, ["adamw"], outcome=_outcome_from(lambda o, lr: -lr))
  assert len(protocols.cpu_long_tuned_extensions(specs)["adamw"]) == 3
  assert max(_rates(specs, "adamw")) == pytest.approx(6e-3 * 8)
