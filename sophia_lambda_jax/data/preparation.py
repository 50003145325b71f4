"""Tokenise a source into token shards: `prepare`, `builtin_dataset_dir`, `slj tokenize`.

Output directory layout (`DIR`):

    plan.json                 the source, its fingerprint, the split fraction and work units;
                              written first, so a resumed run can check it continues the same job
    train-00000.bin ...       token shards (see `shards`), one per work unit and split; every
    val-00000.bin ...         document is followed by EOS (151643)
    unit-00000.counts.npy     train-split id frequencies of that unit (int64, sparse pairs)
    unit-00000.json           the unit's shard sizes and the range of its documents' split
                              draws (`sources.split_draw`); written after its shards, so it
                              marks the unit complete
    train_counts.npy          int64 (151936,) frequency of every id in the train split, the
                              table the loader's compact vocabulary is ranked from
    manifest.json             written last: its presence means the directory is complete

Resumption: every file is written under a temporary name and renamed into place, so a killed
run leaves only hidden `.NAME.tmp` files (deleted on the next run) and complete shards. The
next run re-plans, checks the plan matches, skips units whose `unit-*.json` and shards are
present and intact, and tokenises the rest. A second process that calls `prepare` on the same
directory meanwhile is refused, naming the first one's PID (`directory_lock`); the built-in
corpus cache instead waits for it and then finds the finished manifest.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import ctypes
import hashlib
import json
import math
import multiprocessing
import os
import signal
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from sophia_lambda_jax import interrupts
from sophia_lambda_jax.data import shards, sources
from sophia_lambda_jax.directory_lock import DirectoryInUse, directory_lock
from sophia_lambda_jax.data.tokenizer import EOS_ID, QWEN_VOCAB_SIZE, get_tokenizer

FORMAT = "sophia-lambda-jax/token-shards"
FORMAT_VERSION = 1
DEFAULT_VAL_FRACTION = 0.01
# The built-in corpus is small and its documents very unequal in size: 2 % of the documents
# gives a validation split large enough for a stable loss (see docs/decisions.md,
# 2026-11-23: the built-in corpus and its validation split).
BUILTIN_VAL_FRACTION = 0.02
MANIFEST = "manifest.json"
PLAN = "plan.json"
COUNTS = "train_counts.npy"
# Characters of text handed to the BPE at once inside a worker.
_ENCODE_CHUNK_CHARS = 1 << 20


def default_cache_dir() -> Path:
  return Path(os.environ.get("SLJ_DATA_CACHE") or
              Path.home() / ".cache" / "sophia_lambda_jax").expanduser()


def _fingerprint(source: str, units: list[sources.WorkUnit]) -> str:
  if source == "builtin":
    return "builtin:" + sources.builtin_fingerprint()
  h = hashlib.blake2b(digest_size=8)
  for unit in units:
    size = Path(unit.path).stat().st_size if unit.kind in ("parquet", "jsonl", "txt") else 0
    h.update(f"{unit.kind}\0{unit.name}\0{unit.start}\0{unit.stop}\0{size}\n".encode())
  return h.hexdigest()


def _unit_file(index: int) -> str:
  return f"unit-{index:05d}.json"


def _tokenize_unit(job: tuple[str, int, tuple, float]) -> dict:
  """Worker: tokenise one unit into its train/val shards, counts, then its unit json."""
  out_dir, index, unit, val_fraction = job
  out_dir = Path(out_dir)
  unit = sources.WorkUnit(*unit)
  tokenizer = get_tokenizer()
  counts = np.zeros(QWEN_VOCAB_SIZE, np.int64)
  docs = {"train": 0, "val": 0}
  draws = [math.inf, -math.inf]  # the smallest and largest split draw of the unit
  writers = {split: shards.ShardWriter(out_dir / f"{split}-{index:05d}.bin", QWEN_VOCAB_SIZE)
             for split in ("train", "val")}

  def flush(batch):
    pieces = {"train": [], "val": []}
    for (split, _), ids in zip(batch, tokenizer.encode_batch([t for _, t in batch])):
      ids.append(EOS_ID)
      pieces[split].append(np.asarray(ids, dtype=np.uint32))
      docs[split] += 1
    for split, arrays in pieces.items():
      if arrays:
        ids = np.concatenate(arrays)
        writers[split].write(ids)
        if split == "train":  # one histogram per chunk: ~1 MB of text
          counts[:] += np.bincount(ids, minlength=QWEN_VOCAB_SIZE)

  try:
    batch, chars = [], 0
    for key, text in sources.iter_documents(unit):
      draw = sources.split_draw(key)
      draws[:] = min(draws[0], draw), max(draws[1], draw)
      split = "val" if draw < val_fraction else "train"
      batch.append((split, text))
      chars += len(text)
      if chars >= _ENCODE_CHUNK_CHARS:
        flush(batch)
        batch, chars = [], 0
    flush(batch)
  except BaseException:
    for writer in writers.values():
      writer.abort()
    raise
  record = {"unit": index, "name": unit.name}
  for split, writer in writers.items():
    writer.close()
    record[split] = {"file": writer.path.name, "tokens": writer.count, "documents": docs[split],
                     "crc32": writer.crc32}
  nonzero = np.flatnonzero(counts)
  counts_path = out_dir / f"unit-{index:05d}.counts.npy"
  with open(shards.temp_path(counts_path), "wb") as f:
    np.save(f, np.stack([nonzero, counts[nonzero]]).astype(np.int64))
  os.replace(shards.temp_path(counts_path), counts_path)
  record["counts"] = counts_path.name
  record["split_draws"] = draws if docs["train"] + docs["val"] else None
  shards.atomic_write_bytes(out_dir / _unit_file(index), json.dumps(record).encode())
  return record


def _completed_unit(out_dir: Path, index: int) -> dict | None:
  """The unit's record if it and its files are complete and intact, else None."""
  path = out_dir / _unit_file(index)
  if not path.is_file():
    return None
  try:
    record = json.loads(path.read_text())
    for split in ("train", "val"):
      header = shards.read_header(out_dir / record[split]["file"])
      if header.count != record[split]["tokens"]:
        return None
    if not (out_dir / record["counts"]).is_file():
      return None
  except (OSError, ValueError, KeyError):
    return None
  return record


def _check_existing(out_dir: Path, name: str, expected: dict) -> dict | None:
  path = out_dir / name
  if not path.is_file():
    return None
  existing = json.loads(path.read_text())
  differs = {k: (existing.get(k), v) for k, v in expected.items() if existing.get(k) != v}
  if differs:
    details = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in differs.items())
    state = "prepared" if name == MANIFEST else "partly prepared"
    raise ValueError(f"{out_dir} already holds a {state} dataset with other settings "
                     f"({details}); remove it or choose another output directory")
  return existing


def load_manifest(data_dir: str | os.PathLike) -> dict:
  """The manifest of a prepared directory; FileNotFoundError naming it if it is not one."""
  data_dir = Path(data_dir)
  if not data_dir.exists():
    raise FileNotFoundError(f"data directory {data_dir} does not exist")
  path = data_dir / MANIFEST
  if not path.is_file():
    raise FileNotFoundError(f"{data_dir} is not a prepared dataset (no {MANIFEST}; a run of "
                            f"`slj tokenize SOURCE {data_dir}` was interrupted or never made)")
  manifest = json.loads(path.read_text())
  if manifest.get("format") != FORMAT:
    raise ValueError(f"{path}: not a {FORMAT} manifest")
  if manifest.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{path}: format version {manifest.get('format_version')}, this library "
                     f"reads {FORMAT_VERSION}")
  return manifest


def data_fingerprint(data_dir: str | os.PathLike) -> str:
  """What a run resumed on this directory must find again: the source fingerprint of the
  manifest, every shard's name, token count and checksum, and the files' sizes on disk.
  Cheap (no shard is read); a shard rewritten in place with the same size is caught by its
  checksum when the loader first reads it."""
  data_dir = Path(data_dir)
  manifest = load_manifest(data_dir)
  h = hashlib.blake2b(digest_size=8)
  h.update(f"{manifest['fingerprint']}\0{manifest.get('vocab_size')}\n".encode())
  for split in ("train", "val"):
    for entry in manifest["splits"][split]["shards"]:
      path = data_dir / entry["file"]
      size = path.stat().st_size if path.is_file() else -1
      h.update(f"{split}\0{entry['file']}\0{entry['tokens']}\0{entry.get('crc32')}\0{size}"
               "\n".encode())
  return h.hexdigest()


def prepare(source: str, out_dir: str | os.PathLike, *,
            val_fraction: float | None = None, num_workers: int | None = None,
            progress: bool | None = None, wait_for_lock: bool = False) -> Path:
  """Tokenise `source` (see `sources`) into uint32 shards under `out_dir`; return `out_dir`.

  val_fraction: share of documents in the validation split (by key hash); None means
  BUILTIN_VAL_FRACTION (0.02) for "builtin" and DEFAULT_VAL_FRACTION (0.01) otherwise. A
  positive one that puts no document of a small corpus there is refused (a ValueError
  naming a --val-fraction that would; the directory is left without the dataset's files, so
  the same `out_dir` can be used again); 0 asks for no validation split (a warning:
  `slj train` needs one).

  Idempotent (a finished directory with the same source and settings is returned as is) and
  resumable (see the module docstring). Work units run in `num_workers` spawned processes
  (default: one per CPU core, at most one per pending unit; 1 runs in this process). The
  workers are spawned, so a script that calls `prepare` at import time needs the usual
  `if __name__ == "__main__":` guard.
  `progress`: tqdm bar; None shows it only on a terminal.
  wait_for_lock: another process preparing `out_dir` makes this call wait for it and then
  find its result (True) or raise DirectoryInUse naming that process at once (False).

  Raises FileNotFoundError (missing source path), ValueError (empty corpus, no `text`
  column, bad records, out_dir prepared with other settings), ImportError (tfds:/hf: without
  the optional package); each message names the file or argument.
  """
  if val_fraction is None:
    val_fraction = BUILTIN_VAL_FRACTION if source == "builtin" else DEFAULT_VAL_FRACTION
  if not (isinstance(val_fraction, (int, float)) and 0.0 <= val_fraction < 1.0):
    raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
  if num_workers is not None and (not isinstance(num_workers, int) or num_workers < 1):
    raise ValueError(f"num_workers must be a positive int or None, got {num_workers!r}")
  out_dir = Path(out_dir).expanduser()
  units = sources.plan_units(source)  # raises for a missing or unreadable source first
  settings = {"format": FORMAT, "format_version": FORMAT_VERSION,
              "fingerprint": _fingerprint(source, units), "val_fraction": float(val_fraction),
              "vocab_size": QWEN_VOCAB_SIZE, "eos_id": EOS_ID, "tokenizer": "qwen2"}
  with directory_lock(out_dir, wait=wait_for_lock, what="`slj tokenize`"):
    if _check_existing(out_dir, MANIFEST, settings) is not None:
      return out_dir
    plan = dict(settings, source=source, units=[list(u) for u in units])
    if _check_existing(out_dir, PLAN, settings) is None:
      shards.atomic_write_bytes(out_dir / PLAN, json.dumps(plan, indent=1).encode())
    for leftover in out_dir.glob(".*.tmp"):  # from a killed run: never complete
      leftover.unlink()
    records = {i: _completed_unit(out_dir, i) for i in range(len(units))}
    pending = [i for i, r in records.items() if r is None]
    _run_units(out_dir, units, pending, records, val_fraction, num_workers, progress)
    return _write_manifest(out_dir, source, units, records, settings)


def _run_units(out_dir, units, pending, records, val_fraction, num_workers, progress):
  jobs = [(str(out_dir), i, tuple(units[i]), float(val_fraction)) for i in pending]
  workers = min(num_workers or os.cpu_count() or 1, max(len(jobs), 1))
  done_tokens = sum(r["train"]["tokens"] + r["val"]["tokens"]
                    for r in records.values() if r is not None)
  with tqdm(total=len(units), initial=len(units) - len(pending), unit="unit",
            desc=f"tokenize {out_dir.name}", disable=None if progress is None else not progress,
            dynamic_ncols=True) as bar:
    bar.set_postfix(tokens=done_tokens)

    def finished(record):
      nonlocal done_tokens
      records[record["unit"]] = record
      done_tokens += record["train"]["tokens"] + record["val"]["tokens"]
      bar.set_postfix(tokens=done_tokens)
      bar.update(1)

    if workers <= 1:
      for job in jobs:
        finished(_tokenize_unit(job))
    else:
      # spawn, not fork: the caller may already run JAX threads, which fork would copy. An
      # executor (unlike multiprocessing.Pool) raises instead of hanging if a worker is killed.
      with concurrent.futures.ProcessPoolExecutor(
          workers, mp_context=multiprocessing.get_context("spawn"),
          initializer=_die_with_parent, initargs=(os.getpid(),)) as pool:
        futures = [pool.submit(_tokenize_unit, job) for job in jobs]
        try:
          for future in concurrent.futures.as_completed(futures):
            finished(future.result())
        except BaseException:
          # Ctrl-C, SIGTERM (under `slj`) or a failed unit: stop the workers before the
          # directory lock is released, so that nothing writes into it afterwards.
          for future in futures:
            future.cancel()
          processes = list((pool._processes or {}).values())  # no public handle in 3.11
          for process in processes:
            process.terminate()
          for process in processes:
            process.join()
          raise


def _die_with_parent(parent: int) -> None:
  """Worker initializer: the kernel kills this worker when its parent dies, however it
  dies (kill -9 included), so none outlives the directory lock (Linux; elsewhere a no-op)."""
  if not sys.platform.startswith("linux"):
    return
  PR_SET_PDEATHSIG = 1
  ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
  if os.getppid() != parent:  # the parent died before the line above
    os._exit(1)


def _write_manifest(out_dir, source, units, records, settings) -> Path:
  counts = np.zeros(QWEN_VOCAB_SIZE, np.int64)
  splits = {s: {"tokens": 0, "documents": 0, "shards": []} for s in ("train", "val")}
  for i in range(len(units)):
    record = records[i]
    for split in ("train", "val"):
      entry = record[split]
      splits[split]["tokens"] += entry["tokens"]
      splits[split]["documents"] += entry["documents"]
      crc = entry.get("crc32")  # a unit finished before checksums existed: compute it now
      if crc is None:
        crc = shards.payload_crc32(out_dir / entry["file"])
      splits[split]["shards"].append({"file": entry["file"], "tokens": entry["tokens"],
                                      "crc32": crc})
    ids, freq = np.load(out_dir / record["counts"])
    counts[ids] += freq
  if splits["train"]["tokens"] + splits["val"]["tokens"] == 0:
    names = sorted({u.name if u.kind != "builtin" else "builtin" for u in units})
    raise ValueError(f"empty corpus: source {source!r} holds no non-empty document "
                     f"(files: {', '.join(names[:10])}{' ...' if len(names) > 10 else ''})")
  if splits["train"]["tokens"] == 0:
    raise ValueError(f"source {source!r}: every document fell into the validation split "
                     f"(val_fraction={settings['val_fraction']}); the train split is empty")
  if splits["val"]["tokens"] == 0 and settings["val_fraction"] > 0:
    _remove_units(out_dir, records)  # a rerun with another val_fraction starts afresh
    raise ValueError(_empty_validation_split(source, settings["val_fraction"],
                                             splits["train"]["documents"], records))
  if splits["val"]["tokens"] == 0:  # val_fraction 0: asked for
    warnings.warn(f"{out_dir}: the validation split of {source!r} is empty "
                  f"(val_fraction=0, {splits['train']['documents']} documents); `slj train` "
                  "needs one", stacklevel=3)
  with open(shards.temp_path(out_dir / COUNTS), "wb") as f:
    np.save(f, counts)
  os.replace(shards.temp_path(out_dir / COUNTS), out_dir / COUNTS)
  manifest = dict(settings, source=source, counts=COUNTS, splits=splits,
                  created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  python=sys.version.split()[0])
  shards.atomic_write_bytes(out_dir / MANIFEST, json.dumps(manifest, indent=1).encode())
  return out_dir


def _empty_validation_split(source: str, val_fraction: float, documents: int,
                            records: dict) -> str:
  """The one line refusing a corpus whose validation split came out empty, with the
  --val-fraction that would put a document there: the shortest decimal above the smallest
  split draw and not above the largest (the train split keeps a document)."""
  line = (f"source {source!r}: the validation split would be empty (--val-fraction "
          f"{val_fraction} puts none of its {documents} documents there)")
  ranges = [r.get("split_draws") for r in records.values()]
  if any("split_draws" not in r for r in records.values()):  # units from an older version
    return line + "; use a larger --val-fraction"
  low = min(r[0] for r in ranges if r is not None)
  high = max(r[1] for r in ranges if r is not None)
  for decimals in range(1, 18):
    fraction = math.ceil(low * 10**decimals) / 10**decimals
    if fraction <= low:
      fraction += 10.0**-decimals
    if fraction <= high:
      return line + f"; --val-fraction {round(fraction, decimals)} would put at least one there"
  return line + (f"; with {documents} document(s) no --val-fraction leaves both splits "
                 "non-empty: add documents")


def _remove_units(out_dir: Path, records: dict) -> None:
  """Delete the plan and every unit's files: what `prepare` wrote for this split."""
  for record in records.values():
    for name in (record["train"]["file"], record["val"]["file"], record["counts"],
                 _unit_file(record["unit"])):
      (out_dir / name).unlink(missing_ok=True)
  (out_dir / PLAN).unlink(missing_ok=True)


def builtin_dataset_dir(cache_dir: str | os.PathLike | None = None, *,
                        progress: bool | None = None) -> Path:
  """The built-in corpus, tokenised once into `cache_dir` and reused.

  cache_dir defaults to $SLJ_DATA_CACHE, else ~/.cache/sophia_lambda_jax. The subdirectory is
  named after a fingerprint of the running Python's document list, so another Python version
  gets its own copy. Concurrent callers are safe: `prepare` holds a lock on the directory and
  the manifest appears atomically, last.
  """
  cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
  target = cache / f"builtin-{sources.builtin_fingerprint()}"
  if (target / MANIFEST).is_file():
    return target
  return prepare("builtin", target, progress=progress, wait_for_lock=True)


def resolve_data(data: str | os.PathLike) -> Path:
  """"builtin" -> `builtin_dataset_dir()`; a prepared directory -> itself (checked)."""
  if str(data) == "builtin":
    return builtin_dataset_dir()
  path = Path(data).expanduser()
  load_manifest(path)
  return path


def cli_tokenize(argv: list[str]) -> int:
  """`slj tokenize SOURCE OUT [--val-fraction F] [--workers N] [--no-progress]`."""
  parser = argparse.ArgumentParser(
      prog="slj tokenize",
      description="Tokenise a corpus with the Qwen2 BPE into uint32 shards plus a validation "
                  "split (resumable: run the same command again after an interruption).")
  parser.add_argument("source", help="'builtin', a parquet/jsonl/txt file, directory or glob "
                      "(quote globs), 'tfds:NAME' or 'hf:NAME'")
  parser.add_argument("out", help="output directory")
  parser.add_argument("--val-fraction", type=float, default=None,
                      help=f"fraction of documents in the validation split (default "
                      f"{DEFAULT_VAL_FRACTION}; {BUILTIN_VAL_FRACTION} for builtin)")
  parser.add_argument("--workers", type=int, default=None, help="processes (default: cores)")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")
  args = parser.parse_args(argv)
  val_fraction = args.val_fraction
  start = time.perf_counter()
  try:
    out = prepare(args.source, args.out, val_fraction=val_fraction, num_workers=args.workers,
                  progress=False if args.no_progress else None)
    manifest = load_manifest(out)
  except (FileNotFoundError, ValueError, ImportError) as e:
    print(f"slj tokenize: error: {e}", file=sys.stderr)
    return 2
  except DirectoryInUse as e:
    print(f"slj tokenize: error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM under `slj`: the workers are stopped
    signum = interrupts.signal_of(e)
    raise interrupts.Interrupted(f"{interrupts.interrupted_by(signum)}; the workers were "
                                 f"stopped, {args.out} keeps the finished units and the same "
                                 "command resumes", signum) from None
  train, val = manifest["splits"]["train"], manifest["splits"]["val"]
  print(f"{out}: train {train['tokens']:,} tokens ({train['documents']:,} documents), "
        f"val {val['tokens']:,} tokens ({val['documents']:,} documents) "
        f"[{time.perf_counter() - start:.1f} s]")
  return 0
