"""A training run's directory, read: its status, its newest checkpoint, its model and
tokenizer, its export as a HuggingFace directory, and the commands that use them.

    from sophia_lambda_jax import runs
    from sophia_lambda_jax.models import sampler
    loaded = runs.load("runs/demo")              # or a HuggingFace Qwen2 directory
    ids = loaded.tokenizer.encode("Once upon a time")
    out = sampler.generate(loaded.model, ids, 20)
    print(loaded.tokenizer.decode(out[len(ids):]))

A run directory is what `slj train --out DIR` writes (`train.loop`):

    config.json        the TrainConfig
    model.json         the QwenConfig it trains
    compact_vocab.npy  the id table of a compact vocabulary
    metrics.jsonl      one JSON line per logged step
    checkpoints/       orbax checkpoints, one folder per step (`train.checkpoint`)
    summary.json       written when the run has finished
    failed.json        written by `slj compare` when the run raised

Runs written before model.json and compact_vocab.npy existed are rebuilt from config.json
(preset + overrides) and, for a compact vocabulary, from the data folder it names.

`export_run` writes a run as a HuggingFace Qwen2 directory that transformers loads offline
and that scores the run's loss (a compact vocabulary stays compact).
`cli_generate`, `cli_eval` and `cli_export` are `slj generate`, `slj eval` and `slj export`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from sophia_lambda_jax import data, interrupts
from sophia_lambda_jax.models import hf, qwen, sampler
from sophia_lambda_jax.models.loading import Loaded, VocabTokenizer, evaluate, load_hf
from sophia_lambda_jax.train import checkpoint

SUMMARY = "summary.json"
FAILED = "failed.json"
CHECKPOINTS = "checkpoints"


# ----------------------------------------------------------------------------- status


def run_status(run_dir) -> str:
  """'done' (summary.json written), 'failed' (failed.json written), 'partial' (started,
  not finished: will resume) or 'pending'."""
  run_dir = Path(run_dir)
  if (run_dir / SUMMARY).is_file():
    return "done"
  if (run_dir / FAILED).is_file():
    return "failed"
  if run_dir.is_dir() and any(run_dir.iterdir()):
    return "partial"
  return "pending"


def read_summary(run_dir) -> dict | None:
  """The run's summary.json, or None before the run has finished."""
  path = Path(run_dir) / SUMMARY
  if not path.is_file():
    return None
  with open(path) as f:
    return json.load(f)


def is_run_directory(path) -> bool:
  """Whether `path` was written by `slj train` (checkpoints/, or a TrainConfig config.json)."""
  path = Path(path)
  if (path / CHECKPOINTS).is_dir():
    return True
  try:
    return "optimizer" in json.loads((path / "config.json").read_text())
  except (OSError, ValueError, TypeError):
    return False


def newest_checkpoint(run_dir) -> int | None:
  """The step of the checkpoint that `load`, `slj generate`, `slj eval` and `slj export`
  read (None when the run has no complete checkpoint): the newest that passes its checksums
  (`train.checkpoint.readable_step`, which says in one line which damaged one it skipped;
  ValueError when every one is damaged)."""
  directory = Path(run_dir) / CHECKPOINTS
  if checkpoint.latest_step(directory) is None:
    return None
  return checkpoint.readable_step(directory)


# ----------------------------------------------------------------------------- load


def _model_config(run_dir: Path, run_config: dict[str, Any]) -> qwen.QwenConfig:
  stored = run_dir / "model.json"
  if stored.is_file():
    return qwen.QwenConfig(**json.loads(stored.read_text()))
  overrides = dict(run_config.get("model_overrides") or {},
                   compute_dtype=run_config.get("compute_dtype", "float32"))
  if run_config.get("init_from"):
    return hf.config_from_hf(hf.read_config(run_config["init_from"]), **overrides)
  return qwen.get_config(run_config["model"], **overrides)


def _compact_vocab(run_dir: Path, run_config: dict[str, Any], vocab_size: int):
  if vocab_size >= data.QWEN_VOCAB_SIZE:
    return None
  stored = run_dir / data.COMPACT_VOCAB_FILE
  if stored.is_file():
    vocab = data.CompactVocab.load(stored)
  else:  # a run from before the table was stored: rank it again from its data folder
    data_dir = data.resolve_data(run_config["data"])
    counts = np.load(data_dir / data.load_manifest(data_dir)["counts"])
    vocab = data.CompactVocab.from_counts(counts, vocab_size)
  if vocab.size != vocab_size:
    raise ValueError(f"{stored} holds a {vocab.size}-id table; the model has {vocab_size} ids")
  return vocab


def _load_run(run_dir: Path, compute_dtype: str | None) -> Loaded:
  config_file = run_dir / "config.json"
  if not config_file.is_file():
    raise FileNotFoundError(f"{config_file} not found: {run_dir} is not a complete run "
                            f"directory")
  run_config = json.loads(config_file.read_text())
  config = _model_config(run_dir, run_config)
  if compute_dtype is not None:
    config = dataclasses.replace(config, compute_dtype=compute_dtype)
  if checkpoint.latest_step(run_dir / CHECKPOINTS) is None:
    raise FileNotFoundError(f"run directory {run_dir} has no complete checkpoint in "
                            f"{run_dir / CHECKPOINTS} (train it first: slj train --out "
                            f"{run_dir})")
  abstract = nnx.eval_shape(lambda: qwen.Qwen(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  # The step newest_checkpoint names, verified once, as it is read.
  step, params = checkpoint.restore_params(run_dir / CHECKPOINTS,
                                           nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
  nnx.replace_by_pure_dict(state, params)
  model = nnx.merge(graphdef, state)
  tokenizer = VocabTokenizer(config.vocab_size,
                             _compact_vocab(run_dir, run_config, config.vocab_size))
  if run_status(run_dir) != "done":  # say which weights these are
    print(f"{run_dir}: the run has not finished: using its checkpoint at step {step} of "
          f"{run_config.get('steps')}", file=sys.stderr)
  return Loaded(model, tokenizer, step, run_config)


def load(path, compute_dtype: str | None = None) -> Loaded:
  """The model of a run directory's newest intact checkpoint, or of a HuggingFace Qwen2
  directory, with its tokenizer. For a run that has not finished, a line on stderr names
  the checkpoint's step.

  Args:
    path: a run directory (`slj train --out`, has `checkpoints/`) or a HuggingFace Qwen2
      directory (config.json + *.safetensors; `models.load_hf`).
    compute_dtype: "float32" or "bfloat16"; None keeps the run's (float32 for HuggingFace).

  Raises FileNotFoundError / ValueError with one line naming the path: no such directory,
  a run without a checkpoint or whose checkpoints are all damaged, a HuggingFace directory
  of another architecture.
  """
  path = Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"{path} is not a directory (expected a run directory or a "
                            f"HuggingFace Qwen2 directory)")
  if is_run_directory(path):
    return _load_run(path, compute_dtype)
  if not (path / "config.json").is_file():
    raise FileNotFoundError(f"{path} has neither checkpoints/ (a run directory) nor "
                            f"config.json (a HuggingFace directory)")
  return load_hf(path, compute_dtype)


# ----------------------------------------------------------------------------- export


def _write_export(model, compact, out: Path, dtype: str) -> Path:
  """`model` written into `out` as a HuggingFace Qwen2 directory: weights in `dtype`,
  config.json, generation_config.json (EOS as BOS and EOS, greedy) and its tokenizer: Qwen2's,
  or for a compact vocabulary `compact` that vocabulary's (`hf.write_compact_tokenizer`)."""
  eos = data.EOS_ID if compact is None else compact.eos_id
  out = hf.to_hf(model, out, dtype=dtype)
  config = hf.read_config(out)
  config.update(bos_token_id=eos, eos_token_id=eos)
  (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
  (out / "generation_config.json").write_text(json.dumps(
      {"bos_token_id": eos, "eos_token_id": eos, "do_sample": False}, indent=2) + "\n")
  if compact is None:
    hf.write_tokenizer(out, model.config.max_seq_len)
  else:
    hf.write_compact_tokenizer(out, compact, model.config.max_seq_len)
  return out


# The names an export of either vocabulary writes: `--overwrite` replaces these (a previous
# export's weights of another sharding, or tokenizer of the other kind, included) and leaves
# other files alone.
_EXPORT_NAMES = ("config.json", "generation_config.json", "model.safetensors",
                 "model.safetensors.index.json", "model-*-of-*.safetensors",
                 "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "qwen2_bpe.json", "compact_vocab.npy", "tokenization_compact_qwen2.py")


def _export_target(run: Path, out: Path, overwrite: bool) -> None:
  """Refuse an export target that holds files the export did not write (unless
  `overwrite`) or that is a run directory (its config.json is the run's)."""
  if out.exists() and not out.is_dir():
    raise FileExistsError(f"{out} is a file; choose a directory for the export")
  if out.resolve() == run.resolve() or is_run_directory(out):
    raise ValueError(f"{out} is a run directory: an export there would replace its "
                     "config.json; choose another output directory")
  if out.is_dir() and any(out.iterdir()) and not overwrite:
    names = sorted(p.name for p in out.iterdir())
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    raise ValueError(f"{out} is not empty ({shown}); choose a new or empty directory, or "
                     "pass --overwrite to replace the files of an earlier export there")


def _move_into_place(staged: Path, out: Path) -> None:
  """The finished export `staged` as `out`: renamed when `out` is new or empty; else each
  file replaces its namesake, config.json removed first and put back last, so that an
  interrupted replacement never looks like a complete model directory."""
  if not out.exists() or not any(out.iterdir()):
    os.replace(staged, out)  # an empty directory is replaced atomically
    return
  (out / "config.json").unlink(missing_ok=True)
  for pattern in _EXPORT_NAMES:
    for stale in out.glob(pattern):
      stale.unlink()
  files = sorted(staged.iterdir(), key=lambda p: p.name == "config.json")
  for file in files:
    os.replace(file, out / file.name)
  staged.rmdir()


def export_run(run, out, dtype: str = "float32", overwrite: bool = False) -> Path:
  """Writes the newest intact checkpoint of training run `run` as a HuggingFace Qwen2
  directory `out` that transformers loads offline (weights in `dtype`, config.json,
  generation_config.json, tokenizer files). A compact vocabulary is exported as it is: the
  weights at its size, its id table and a tokenizer that gives the run's ids
  (`models.hf.write_compact_tokenizer`; load it with `trust_remote_code=True`), so the
  directory scores the run's loss. Returns `out`.

  The files are written into a hidden sibling folder, then renamed into place, so `out`
  never holds a partial export. `out` must be new or empty, unless `overwrite`: then the
  export's files replace those of the same names and other files are kept. A run
  directory is never a target."""
  if dtype not in hf.EXPORT_DTYPES:
    raise ValueError(f"--dtype must be one of {sorted(hf.EXPORT_DTYPES)}, got {dtype!r}")
  if not is_run_directory(run):
    raise FileNotFoundError(f"{run} is not a run directory (slj train --out): no "
                            f"checkpoints/ in it")
  run, out = Path(run), Path(out)
  _export_target(run, out, overwrite)
  loaded = load(run)
  out.parent.mkdir(parents=True, exist_ok=True)
  staged = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
  hf.usual_mode(staged)  # it becomes `out`
  replacing = False
  try:
    _write_export(loaded.model, loaded.tokenizer.compact, staged, dtype)
    replacing = out.is_dir() and any(out.iterdir())
    _move_into_place(staged, out)
  except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM under `slj`
    shutil.rmtree(staged, ignore_errors=True)
    signum = interrupts.signal_of(e)
    raise interrupts.Interrupted(
        f"{interrupts.interrupted_by(signum)}; the export into {out} was not completed: "
        + ("it has no config.json until an export there completes" if replacing else
           "nothing was written there"), signum) from None
  except BaseException:
    shutil.rmtree(staged, ignore_errors=True)
    raise
  return out


# ----------------------------------------------------------------------------- commands


def cli_generate(argv: list[str]) -> int:
  """`slj generate PATH --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-p P]
  [--seed S]`: print the prompt's continuation (up to the first end-of-text)."""
  parser = argparse.ArgumentParser(
      prog="slj generate",
      description="Continue a prompt with a trained run's newest checkpoint or a HuggingFace "
                  "Qwen2 directory (KV-cache sampling; stops at end-of-text).")
  parser.add_argument("path", help="run directory (slj train --out) or HuggingFace Qwen2 "
                      "directory")
  parser.add_argument("--prompt", required=True, help="text to continue ('' starts a new "
                      "document)")
  parser.add_argument("--max-new-tokens", type=int, default=64)
  parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
  parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass (1: all tokens)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  try:
    loaded = load(args.path)
    _, _, text = sampler.continuation(loaded.model, loaded.tokenizer, args.prompt,
                                      args.max_new_tokens, args.temperature, args.top_p,
                                      args.seed)
  except (ValueError, FileNotFoundError) as e:
    print(f"slj generate: error: {e}", file=sys.stderr)
    return 2
  print(text)
  return 0


def cli_eval(argv: list[str]) -> int:
  """`slj eval PATH [--data DIR] [--batches N] [--batch-size B] [--seq-len S]`: validation
  loss, perplexity and tokens evaluated, as JSON."""
  parser = argparse.ArgumentParser(
      prog="slj eval",
      description="Validation loss and perplexity of a run's newest checkpoint or of a "
                  "HuggingFace Qwen2 directory, as JSON on stdout.")
  parser.add_argument("path", help="run directory or HuggingFace Qwen2 directory")
  parser.add_argument("--data", help="prepared data directory or 'builtin' (default: the "
                      "run's; required for a HuggingFace directory)")
  parser.add_argument("--batches", type=int, help="validation batches (default: as the run's "
                      "final evaluation, the whole split when it had final_eval_batches null; "
                      "8 for a HuggingFace directory)")
  parser.add_argument("--batch-size", type=int, help="sequences per batch (default: the "
                      "run's, 8 otherwise)")
  parser.add_argument("--seq-len", type=int, help="tokens per sequence (default: the run's, "
                      "otherwise min(512, the model's context))")
  args = parser.parse_args(argv)
  try:
    for flag in ("batches", "batch_size", "seq_len"):  # 0 is not "the default"
      value = getattr(args, flag)
      if value is not None and value < 1:
        raise ValueError(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")
    if not is_run_directory(args.path) and args.data is None:
      raise ValueError(f"{args.path} is not a run directory: pass --data DIR (a folder "
                       f"prepared by slj tokenize, or builtin)")
    loaded = load(args.path)
    run = loaded.run_config or {}
    config = loaded.model.config
    data_dir = data.resolve_data(args.data or run["data"])
    data_vocab = int(data.load_manifest(data_dir)["vocab_size"])
    compact = loaded.tokenizer.compact
    if compact is None and config.vocab_size < data_vocab:
      raise ValueError(f"{args.path} has vocab_size {config.vocab_size} with no compact "
                       f"vocabulary table, but {data_dir} holds ids of a {data_vocab}-token "
                       f"vocabulary")
    batch_size = args.batch_size or (run["batch_size"] // run["grad_accum"] if run else 8)
    seq_len = args.seq_len or run.get("seq_len") or min(512, config.max_seq_len)
    if seq_len > config.max_seq_len:
      raise ValueError(f"--seq-len {seq_len} exceeds the model's context of "
                       f"{config.max_seq_len} tokens")
    batches = data.TokenBatches(data_dir, "val", batch_size, seq_len,
                                vocab_size=config.vocab_size, compact_vocab=compact)
    # The run's own final evaluation: final_eval_batches (None: the whole split; runs made
    # before it existed ended with eval_batches).
    own = run.get("final_eval_batches", run.get("eval_batches")) if run else 8
    result = evaluate(loaded.model, batches,
                      args.batches or (batches.num_batches if own is None else own))
  except (ValueError, FileNotFoundError) as e:
    print(f"slj eval: error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(result))
  return 0


def cli_export(argv: list[str]) -> int:
  """`slj export RUN OUT [--dtype float32|bfloat16] [--overwrite]`."""
  parser = argparse.ArgumentParser(
      prog="slj export",
      description="Write a run's newest checkpoint as a HuggingFace Qwen2 directory "
                  "(safetensors, config, generation config, tokenizer) that transformers "
                  "loads offline. A compact vocabulary is exported as it is, with a "
                  "tokenizer that gives the run's ids (load it with trust_remote_code=True).")
  parser.add_argument("run", help="run directory (slj train --out)")
  parser.add_argument("out", help="output directory")
  parser.add_argument("--dtype", default="float32", choices=sorted(hf.EXPORT_DTYPES))
  parser.add_argument("--overwrite", action="store_true",
                      help="export into a directory that is not empty, replacing the files "
                      "of an earlier export there (others are kept)")
  args = parser.parse_args(argv)
  try:
    out = export_run(args.run, args.out, args.dtype, args.overwrite)
  except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
    print(f"slj export: error: {e}", file=sys.stderr)
    return 2
  print(out)
  return 0
