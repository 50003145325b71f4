"""`slj export`: a run as a HuggingFace Qwen2 directory that transformers loads offline and
that is the run's model: the run's token ids, logits and loss (a compact vocabulary stays
compact, with a tokenizer onto its ids), and the same greedy continuation as
`slj generate --temperature 0`."""

import json
import os
import signal

import numpy as np
import optax
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
CODE_TEXT = (
    "import os\n\n\ndef read_lines(path, encoding='utf-8'):\n"
    "    \"\"\"Return the lines of the file at path.\"\"\"\n"
    "    with open(path, encoding=encoding) as f:\n"
    "        return [line.rstrip('\\n') for line in f]\n")
ENGLISH_TEXT = ("The quick brown fox jumps over a lazy dog while seven birds sing in tall "
                "trees, and the rivers flow down to the sea under grey clouds at night.")
TEXTS = {"code": CODE_TEXT, "English": ENGLISH_TEXT, "mixed": MIXED_TEXT}


def _export(run, out):
  assert cli.main(["export", str(run), str(out)]) == 0
  return out


@pytest.fixture(scope="module", params=["compact", "full"])
def exported(request, tmp_path_factory):
  run = request.getfixturevalue(f"{request.param}_run")
  return run, _export(run, tmp_path_factory.mktemp("export") / request.param)


def test_exported_files_get_the_usual_permissions(exported):
  """0666 & ~umask for files, 0777 & ~umask for the directory, as open() and mkdir give
  (safetensors' writer and the staging folder are private otherwise)."""
  _, out = exported
  mask = os.umask(0)
  os.umask(mask)
  assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~mask)
  modes = {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()}
  assert "model.safetensors" in modes
  assert modes == {name: oct(0o666 & ~mask) for name in modes}


def _hf_model(out):
  model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert next(model.parameters()).dtype == torch.float32
  return model


def _hf_tokenizer(out):
  # A compact export's tokenizer is a class in the directory (a tokenizer.json cannot map
  # Qwen2's tokens onto compact ids); the full vocabulary's is a plain tokenizer.json.
  compact = (out / "compact_vocab.npy").exists()
  return transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=compact)


def _hf_logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor(np.asarray(ids)[None], dtype=torch.long)).logits[0].numpy()


def test_export_directory_loads_offline(exported):
  run, out = exported
  compact = runs.load(run).tokenizer.compact
  names = {p.name for p in out.iterdir()}
  assert {"config.json", "model.safetensors", "generation_config.json",
          "tokenizer_config.json"} <= names
  tokenizer_files = ({"qwen2_bpe.json", "compact_vocab.npy", "tokenization_compact_qwen2.py"}
                     if compact is not None else {"tokenizer.json"})
  assert tokenizer_files <= names and "tokenizer.json" not in names - tokenizer_files
  config = transformers.AutoConfig.from_pretrained(out)
  eos = data.EOS_ID if compact is None else compact.eos_id
  assert config.model_type == "qwen2" and config.eos_token_id == eos
  assert config.vocab_size == (data.QWEN_VOCAB_SIZE if compact is None else compact.size)
  assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == eos
  tokenizer = _hf_tokenizer(out)
  assert tokenizer.eos_token_id == eos and len(tokenizer) <= config.vocab_size


def test_exported_logits_equal_ours(exported):
  run, out = exported
  loaded = runs.load(run)
  # A sentence of the corpus, EOS, and text a compact table dropped.
  ids = np.concatenate([loaded.tokenizer.encode("the lazy dog sings 氷河 at night"),
                        [loaded.tokenizer.eos_id], loaded.tokenizer.encode(" grey clouds")])
  if loaded.tokenizer.compact is not None:
    assert (ids == loaded.tokenizer.compact.unk_id).any()  # some inputs are UNK
  ours = np.asarray(loaded.model(ids[None]))[0]
  np.testing.assert_allclose(_hf_logits(_hf_model(out), ids), ours, atol=1e-4)


def _run_loss(loaded, text):
  """The run's own next-token loss on `text`: its tokenizer, its model, token mean."""
  ids = loaded.tokenizer.encode(text)
  logits = loaded.model(ids[None, :-1])
  return float(optax.softmax_cross_entropy_with_integer_labels(logits, ids[None, 1:]).mean())


def _transformers_loss(out, text):
  """The loss transformers reports for `text` with the exported tokenizer and model."""
  ids = _hf_tokenizer(out)(text, return_tensors="pt")["input_ids"]
  with torch.no_grad():
    return float(_hf_model(out)(ids, labels=ids).loss)


@pytest.mark.parametrize("name", ["compact_run", "cpu_run", "full_run"])
def test_exported_model_scores_the_runs_loss(request, tmp_path, name):
  """qwen-tiny's and qwen-cpu's default compact vocabularies and the full Qwen2 one: the
  export, as transformers loads it, scores the run's loss on code, English and mixed text."""
  run = request.getfixturevalue(name)
  out = _export(run, tmp_path / "hf")
  loaded = runs.load(run)
  for kind, text in TEXTS.items():
    ours, theirs = _run_loss(loaded, text), _transformers_loss(out, text)
    print(f"{name} {kind}: run {ours:.5f}, transformers {theirs:.5f}")
    assert abs(theirs - ours) < 0.02, (kind, ours, theirs)


def test_exported_tokenizer_gives_the_runs_ids(exported):
  run, out = exported
  loaded = runs.load(run)
  hf_tokenizer = _hf_tokenizer(out)
  for text in TEXTS.values():
    expected = loaded.tokenizer.encode(text).tolist()
    assert hf_tokenizer(text)["input_ids"] == expected
    assert hf_tokenizer.decode(expected) == loaded.tokenizer.decode(expected)
  # The one difference: special-token text inside a document is plain text to the project
  # (documents cannot forge a separator), the special token to Qwen2's tokenizer;
  # split_special_tokens=True gives the project's ids.
  text = "a <|endoftext|> b"
  assert loaded.tokenizer.eos_id not in loaded.tokenizer.encode(text)
  assert hf_tokenizer(text)["input_ids"] == (
      loaded.tokenizer.encode("a ").tolist() + [loaded.tokenizer.eos_id]
      + loaded.tokenizer.encode(" b").tolist())
  assert hf_tokenizer(text, split_special_tokens=True)["input_ids"] == \
      loaded.tokenizer.encode(text).tolist()


def test_compact_tokenizer_maps_dropped_tokens_to_unk(compact_run, tmp_path):
  out = _export(compact_run, tmp_path / "hf")
  loaded = runs.load(compact_run)
  compact = loaded.tokenizer.compact
  hf_tokenizer = _hf_tokenizer(out)
  ids = hf_tokenizer("the fox 氷河")["input_ids"]
  assert compact.unk_id in ids and max(ids) < compact.size
  decoded = hf_tokenizer.decode(ids)
  assert decoded.startswith("the fox") and data.UNK_TEXT in decoded
  assert decoded == loaded.tokenizer.decode(ids) and hf_tokenizer.unk_token == data.UNK_TEXT
  # Without trust_remote_code transformers finds no tokenizer it can build (there is no
  # tokenizer.json of Qwen2's ids to fall back on) and says so.
  with pytest.raises(ValueError):
    transformers.AutoTokenizer.from_pretrained(out)
  # save_pretrained keeps a tokenizer that loads again.
  hf_tokenizer.save_pretrained(tmp_path / "saved")
  again = transformers.AutoTokenizer.from_pretrained(tmp_path / "saved", trust_remote_code=True)
  assert again(MIXED_TEXT)["input_ids"] == hf_tokenizer(MIXED_TEXT)["input_ids"]


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
  theirs = _hf_logits(_hf_model(out), ids).argmax(-1)
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

  np.testing.assert_array_equal(embedding, ours.astype(ml_dtypes.bfloat16).astype(np.float32))
  model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
  assert next(model.parameters()).dtype == torch.bfloat16


def _files(directory):
  return {p.relative_to(directory): p.read_bytes() for p in directory.rglob("*")
          if p.is_file()}


def test_export_never_replaces_files_it_did_not_write_without_overwrite(compact_run, full_run,
                                                                        tmp_path, capsys):
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
  assert cli.main(["export", str(full_run), str(out), "--overwrite"]) == 0
  assert (out / "notes.txt").read_text() == "keep me"
  assert not (out / "model-00001-of-00002.safetensors").exists()
  assert transformers.AutoConfig.from_pretrained(out).model_type == "qwen2"
  # A compact export over the full one: no tokenizer of the other kind is left behind.
  assert cli.main(["export", str(compact_run), str(out), "--overwrite"]) == 0
  assert not (out / "tokenizer.json").exists() and (out / "compact_vocab.npy").exists()
  assert cli.main(["export", str(full_run), str(out), "--overwrite"]) == 0
  assert (out / "tokenizer.json").exists() and not (out / "compact_vocab.npy").exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no staging folder left


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_export_leaves_no_folder_that_looks_complete(compact_run, tmp_path,
                                                                     capsys, monkeypatch,
                                                                     signum):
  from sophia_lambda_jax.models import hf

  def interrupted(path, compact, model_max_length):  # the signal comes as the tokenizer is written
    os.kill(os.getpid(), signum)

  monkeypatch.setattr(hf, "write_compact_tokenizer", interrupted)
  out = tmp_path / "hf"
  # `slj export` runs in a process of its own, where SIGINT raises KeyboardInterrupt; in the
  # whole suite an earlier test's library may have left another SIGINT handler installed.
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    code = cli.main(["export", str(compact_run), str(out)])
  finally:
    signal.signal(signal.SIGINT, previous)
  assert code == 128 + signum
  err = capsys.readouterr().err
  assert len(err.splitlines()) == 1 and "the export into" in err and \
      "nothing was written there" in err, err
  assert ("SIGTERM" in err) == (signum == signal.SIGTERM)
  assert list(tmp_path.iterdir()) == []  # neither OUT nor its staging folder
