"""runs.load: a run's newest checkpoint (both checkpoint layouts) or a HF directory, with
the tokenizer of the model's vocabulary; models.loading.evaluate of a run's model."""

import json
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from checkpoint_arrays import restore_arrays
from sophia_lambda_jax import data, runs, train
from sophia_lambda_jax.models import hf, loading, qwen
from sophia_lambda_jax.train import checkpoint

STEPS = 6  # the runs of conftest.py


def _params(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_plain_orbax_restore_gives_the_nested_params_that_load_returns(compact_run):
  loaded = runs.load(compact_run)
  assert loaded.step == STEPS and loaded.run_config["model"] == "qwen-tiny"
  named = ocp.StandardCheckpointer().restore(compact_run / "checkpoints" / str(STEPS) /
                                             "params")
  assert sorted(named) == ["embed", "final_norm", "layers"]
  assert sorted(named["layers"]) == ["0", "1"]
  _assert_trees_equal(checkpoint.params_from_names(_params(loaded.model), named),
                      _params(loaded.model))
  # Trained, not the initialisation: the parameters moved.
  fresh = qwen.Qwen(loaded.model.config, rngs=nnx.Rngs(0))
  assert not np.allclose(_params(fresh)["embed"]["embedding"],
                         _params(loaded.model)["embed"]["embedding"])


def test_newest_checkpoint_and_what_a_run_directory_is(compact_run, tmp_path):
  assert runs.is_run_directory(compact_run) and runs.newest_checkpoint(compact_run) == STEPS
  assert not runs.is_run_directory(tmp_path) and runs.newest_checkpoint(tmp_path) is None


def test_compact_run_stores_its_id_table(compact_run, corpus):
  loaded = runs.load(compact_run)
  table = loaded.tokenizer.compact
  counts = np.load(corpus / data.load_manifest(corpus)["counts"])
  expected = data.CompactVocab.from_counts(counts, 1024)
  np.testing.assert_array_equal(table.inverse, expected.inverse)
  np.testing.assert_array_equal(table.forward, expected.forward)
  text = "the quick brown fox jumps over a lazy dog"
  ids = loaded.tokenizer.encode(text)
  assert ids.max() < 1024 - 2  # all kept, none UNK
  assert loaded.tokenizer.decode(ids) == text
  # Text outside the table encodes to UNK, which decodes to a visible placeholder.
  unknown = loaded.tokenizer.encode("the 氷 fox")
  assert table.unk_id in unknown.tolist()
  decoded = loaded.tokenizer.decode(unknown)
  assert decoded.startswith("the") and decoded.endswith(" fox") and data.UNK_TEXT in decoded


def _legacy_copy(run, out):
  """`run` rewritten as a run from before `params`, model.json and compact_vocab.npy: the
  whole TrainState in the flat `state` item under "<index>.<path>" keys."""
  shutil.copytree(run, out, ignore=shutil.ignore_patterns("checkpoints", "model.json",
                                                          data.COMPACT_VOCAB_FILE))
  flat = restore_arrays(run / "checkpoints")
  params = {k: v for k, v in flat.items() if k.startswith("params/")}
  rest = {k: v for k, v in flat.items() if not k.startswith("params/")}
  abstract = _params(runs.load(run).model)
  legacy_keys = checkpoint._legacy_param_keys(abstract)
  leaves = [params["params/" + "/".join(str(k.key) for k in path)]
            for path, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]]
  legacy = dict(zip(legacy_keys, leaves))
  n = len(legacy_keys)
  for key, value in rest.items():  # step keeps index 0; the rest move up by n
    index, name = key.split(".", 1)
    legacy[f"{int(index) + (n if int(index) else 0):05d}.{name}"] = value
  manager = ocp.CheckpointManager((out / "checkpoints").absolute(),
                                  item_handlers=checkpoint._handlers())
  config = json.loads((run / "config.json").read_text())
  manager.save(STEPS, args=ocp.args.Composite(
      state=ocp.args.StandardSave(legacy), config=ocp.args.JsonSave(config),
      meta=ocp.args.JsonSave({"step": STEPS, "data_position": STEPS,
                              "keys": sorted(legacy)})))
  manager.wait_until_finished()
  manager.close()
  return out


def test_runs_with_the_old_checkpoint_layout_load_and_resume(compact_run, tmp_path):
  legacy = _legacy_copy(compact_run, tmp_path / "legacy")
  assert not (legacy / "checkpoints" / str(STEPS) / "params").exists()
  new, old = runs.load(compact_run), runs.load(legacy)
  _assert_trees_equal(_params(old.model), _params(new.model))
  # Without compact_vocab.npy the table is ranked again from the run's data folder.
  np.testing.assert_array_equal(old.tokenizer.compact.inverse,
                                new.tokenizer.compact.inverse)
  # Resuming reads the old layout too: the whole TrainState equals the new layout's.
  from sophia_lambda_jax.train import loop, mesh as mesh_lib

  config = train.TrainConfig.from_json(compact_run / "config.json")
  mesh = mesh_lib.make_mesh(config.mesh)
  program = loop.TrainProgram(config, loop.ModelFunctions(config, mesh), mesh)
  states = [checkpoint.Checkpointer(run / "checkpoints", keep=2).restore(
      STEPS, program.abstract_state) for run in (compact_run, legacy)]
  _assert_trees_equal(states[1], states[0])


def test_load_hf_directory_and_bad_paths(tmp_path):
  config = qwen.get_config("qwen-tiny", vocab_size=151936 + 128)
  model = qwen.Qwen(config, rngs=nnx.Rngs(3))
  hf.to_hf(model, tmp_path / "hf")
  loaded = runs.load(tmp_path / "hf")
  assert loaded.step is None and loaded.tokenizer.compact is None
  _assert_trees_equal(_params(loaded.model), _params(model))
  assert loaded.tokenizer.decode(loaded.tokenizer.encode("Grüße")) == "Grüße"
  with pytest.raises(FileNotFoundError, match="is not a directory"):
    runs.load(tmp_path / "missing")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="neither checkpoints/"):
    runs.load(tmp_path / "empty")


def test_evaluate_equals_the_runs_own_validation_loss(compact_run):
  loaded = runs.load(compact_run)
  summary = json.loads((compact_run / "summary.json").read_text())
  batches = data.TokenBatches(loaded.run_config["data"], "val", 4, 32, vocab_size=1024,
                              compact_vocab=loaded.tokenizer.compact)
  result = loading.evaluate(loaded.model, batches, 2)
  assert result["batches"] == 2 and result["tokens"] == 2 * 4 * 32
  np.testing.assert_allclose(result["loss"], summary["final_val_loss"], rtol=1e-5)
  np.testing.assert_allclose(result["perplexity"], np.exp(result["loss"]), rtol=1e-12)
