"""`slj export`: a run as a HuggingFace Qwen2 directory that transformers loads offline,
with logits equal to ours (on kept ids for a compact vocabulary), the project's token ids,
and the same greedy continuation as `slj generate --temperature 0`."""

import json
import os
import signal

import numpy as np
import pytest
import safetensors
import torch
import transformers

from sophia_lambda_jax import cli, data, runs
from sophia_lambda_jax.models import sampler

MIXED_TEXT = (
    "Plain ASCII, then accents: café, naïve, Ångström, e\u0301 (combining). "
    "CJK: 你好，世界。日本語のテキスト. Emoji: 😀🚀👩‍👩‍👧. "
    "Code:\n    def f(x):\n\treturn {'a': x ** 2}  # ok\n\n\n"
    "Whitespace runs:      end.   \n  Digits: 1234567890, 3.14159, 2026-12-02.")


@pytest.fixture(scope="module", params=["compact", "full"])
def exported(request, tmp_path_factory):
  run = request.getfixturevalue(f"{request.param}_run")
  out = tmp_path_factory.mktemp("export") / request.param
  assert cli.main(["export", str(run), str(out)]) == 0
  return run, out


def _hf_model(out):
  model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert next(model.parameters()).dtype == torch.float32
  return model


def _hf_logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor(np.asarray(ids)[None], dtype=torch.long)).logits[0].numpy()


def test_export_directory_loads_offline(exported):
  _, out = exported
  names = {p.name for p in out.iterdir()}
  assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
          "tokenizer_config.json"} <= names
  config = transformers.AutoConfig.from_pretrained(out)
  assert config.model_type == "qwen2" and config.vocab_size == data.QWEN_VOCAB_SIZE
  generation = transformers.GenerationConfig.from_pretrained(out)
  assert generation.eos_token_id == data.EOS_ID


def test_exported_logits_equal_ours(exported):
  run, out = exported
  loaded = runs.load(run)
  hf_model = _hf_model(out)
  compact = loaded.tokenizer.compact
  # A sentence of the corpus, EOS, and text whose ids a compact table dropped.
  qwen_ids = np.asarray(data.get_tokenizer().encode("the lazy dog sings 氷河 at night")
                        + [data.EOS_ID] + data.get_tokenizer().encode(" grey clouds"))
  our_ids = compact.forward[qwen_ids] if compact is not None else qwen_ids
  ours = np.asarray(loaded.model(our_ids[None]))[0]
  theirs = _hf_logits(hf_model, qwen_ids)
  if compact is None:
    np.testing.assert_allclose(theirs, ours, atol=1e-4)
    return
  assert (compact.forward[qwen_ids] == compact.unk_id).any()  # some inputs were UNK to us
  kept = compact.inverse[:-1]  # Qwen2 ids of the compact ids 0..V-2 (EOS included)
  np.testing.assert_allclose(theirs[:, kept], ours[:, :-1], atol=1e-4)
  # Every dropped id carries UNK's head column.
  dropped = np.setdiff1d(np.arange(data.QWEN_VOCAB_SIZE), kept)[::997]
  np.testing.assert_allclose(theirs[:, dropped],
                             np.repeat(ours[:, -1:], len(dropped), axis=1), atol=1e-4)


def test_exported_tokenizer_gives_the_project_ids(exported):
  _, out = exported
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  ours = data.get_tokenizer()
  expected = ours.encode(MIXED_TEXT)
  assert hf_tokenizer(MIXED_TEXT)["input_ids"] == expected
  assert hf_tokenizer.decode(expected) == ours.decode(expected)
  assert hf_tokenizer.eos_token_id == data.EOS_ID
  # The one difference: special-token text inside a document is plain text to the project
  # (documents cannot forge a separator), the special token to Qwen2's tokenizer;
  # split_special_tokens=True gives the project's ids.
  text = "a <|endoftext|> b"
  assert data.EOS_ID not in ours.encode(text)
  assert hf_tokenizer(text)["input_ids"] == ours.encode("a ") + [data.EOS_ID] + \
      ours.encode(" b")
  assert hf_tokenizer(text, split_special_tokens=True)["input_ids"] == ours.encode(text)


def test_transformers_argmax_follows_slj_generate_greedy(exported, capsys):
  run, out = exported
  prompt, new_tokens = "the quick brown", 12
  assert cli.main(["generate", str(run), "--prompt", prompt, "--max-new-tokens",
                   str(new_tokens), "--temperature", "0"]) == 0
  printed = capsys.readouterr().out
  loaded = runs.load(run)
  prompt_ids, new, text = sampler.continuation(loaded.model, loaded.tokenizer, prompt,
                                               new_tokens)
  assert printed == text + "\n" and len(new) >= 1
  ids = np.concatenate([prompt_ids, new])
  ours = np.asarray(loaded.model(ids[None]))[0]
  compact = loaded.tokenizer.compact
  qwen_ids = compact.to_qwen(ids) if compact is not None else ids
  # An UNK output has no Qwen2 id of its own: feed transformers any dropped id (all
  # share UNK's embedding row).
  dropped = np.setdiff1d(np.arange(data.QWEN_VOCAB_SIZE), compact.inverse[:-1])[0] \
      if compact is not None else None
  qwen_ids = np.where(qwen_ids < 0, dropped if dropped is not None else 0, qwen_ids)
  theirs = _hf_logits(_hf_model(out), qwen_ids).argmax(-1)
  if compact is not None:
    theirs = compact.forward[theirs]
  top2 = np.sort(ours, axis=-1)[:, -2:]
  checked = 0
  for t in range(len(prompt_ids) - 1, len(ids) - 1):
    assert ours[t].argmax() == ids[t + 1]  # greedy generation picked the argmax
    if top2[t, 1] - top2[t, 0] > 1e-3:
      assert theirs[t] == ids[t + 1], t
      checked += 1
  assert checked >= len(new) // 2


def test_bfloat16_export(compact_run, tmp_path):
  out = tmp_path / "bf16"
  assert cli.main(["export", str(compact_run), str(out), "--dtype", "bfloat16"]) == 0
  with safetensors.safe_open(str(out / "model.safetensors"), framework="pt") as f:
    assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"BF16"}
    embedding = f.get_tensor("model.embed_tokens.weight").float().numpy()
  assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
  loaded = runs.load(compact_run)
  ours = np.asarray(loaded.model.embed.embedding[...])
  import ml_dtypes

  kept = loaded.tokenizer.compact.inverse[:-1]
  np.testing.assert_array_equal(embedding[kept],
                                ours[:-1].astype(ml_dtypes.bfloat16).astype(np.float32))
  model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
  assert next(model.parameters()).dtype == torch.bfloat16


def _files(directory):
  return {p.relative_to(directory): p.read_bytes() for p in directory.rglob("*")
          if p.is_file()}


def test_export_never_replaces_files_it_did_not_write_without_overwrite(compact_run, tmp_path,
                                                                        capsys):
  out = tmp_path / "mine"
  out.mkdir()
  (out / "notes.txt").write_text("keep me")
  (out / "config.json").write_text('{"mine": true}')
  (out / "model-00001-of-00002.safetensors").write_bytes(b"an earlier export's shard")
  before, run_before = _files(out), _files(compact_run)
  assert cli.main(["export", str(compact_run), str(out)]) == 2
  err = capsys.readouterr().err
  assert len(err.splitlines()) == 1 and "is not empty" in err and "--overwrite" in err, err
  assert cli.main(["export", str(compact_run), str(compact_run)]) == 2
  err = capsys.readouterr().err
  assert len(err.splitlines()) == 1 and "is a run directory" in err, err
  assert _files(out) == before and _files(compact_run) == run_before
  # --overwrite: the export's files replace theirs (an earlier export's shard included),
  # other files stay.
  assert cli.main(["export", str(compact_run), str(out), "--overwrite"]) == 0
  assert (out / "notes.txt").read_text() == "keep me"
  assert not (out / "model-00001-of-00002.safetensors").exists()
  assert transformers.AutoConfig.from_pretrained(out).model_type == "qwen2"
  assert [p.name for p in tmp_path.iterdir()] == ["mine"]  # no staging folder left


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_export_leaves_no_folder_that_looks_complete(compact_run, tmp_path,
                                                                     capsys, monkeypatch,
                                                                     signum):
  from sophia_lambda_jax.models import hf

  def interrupted(path, model_max_length):  # the signal arrives while the tokenizer is written
    os.kill(os.getpid(), signum)

  monkeypatch.setattr(hf, "write_tokenizer", interrupted)
  out = tmp_path / "hf"
  assert cli.main(["export", str(compact_run), str(out)]) == 128 + signum
  err = capsys.readouterr().err
  assert len(err.splitlines()) == 1 and "the export into" in err and \
      "nothing was written there" in err, err
  assert ("SIGTERM" in err) == (signum == signal.SIGTERM)
  assert list(tmp_path.iterdir()) == []  # neither OUT nor its staging folder
