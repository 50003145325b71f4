"""Where documents come from: the built-in corpus, local files, and optional dataset libraries.

A source is planned into `WorkUnit`s, independent pieces of work that a worker process can
tokenise on its own (a range of the built-in document list, some row groups of one parquet
file, one jsonl or txt file, a record range of a TFDS dataset, one HF dataset). The plan
depends only on the source, never on the number of workers, so a resumed `prepare` with
another worker count finishes the same plan and writes the same shards.

Every document has a stable string key (a relative path, a FineWeb `id`, or file:row); the
train/validation split hashes that key (`is_validation`), so it is deterministic, independent
of file order, and assigns whole documents to one side.

Source strings:
  "builtin"          the standard library's .py sources plus the pydoc topics of the running
                     Python (see `builtin_documents`); no download.
  a file, directory or glob of *.parquet / *.jsonl / *.txt files. Parquet files need a `text`
                     column (FineWeb's published layout: `data/CC-MAIN-*/*.parquet`,
                     `sample/10BT/*.parquet`; the `id` column keys documents when present);
                     jsonl lines are objects with a "text" string; a txt file is one document,
                     or several separated by lines holding only `<|endoftext|>`.
  "tfds:NAME"        a TensorFlow Datasets dataset already prepared in array_record format
                     in the local TFDS data directory (`TFDS_DATA_DIR`, else TFDS's default
                     ~/tensorflow_datasets), split "train", feature "text"; NAME may carry a
                     config and version ("name/config:1.0.0"). Read through
                     `tfds.data_source` (random access, no TensorFlow); needs
                     `tensorflow-datasets`. Nothing is downloaded.
  "hf:NAME"          a HuggingFace `datasets` dataset from the local cache or a local path
                     (split "train", column "text"); needs `datasets`. Runs with
                     HF_DATASETS_OFFLINE=1 unless the caller set that variable.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pyarrow.parquet as pq

FILE_SUFFIXES = (".parquet", ".jsonl", ".txt")
TXT_SEPARATOR = "<|endoftext|>"
# Rows of parquet per work unit (~250M FineWeb tokens, a 1 GB shard): units small enough to
# spread a file over several workers, large enough to keep the number of shards (each one an
# open memory map in the loader) in the hundreds for FineWeb's 100B-token sample.
PARQUET_ROWS_PER_UNIT = 1 << 18
# Bumped when the built-in document list or its reading changes (invalidates caches).
BUILTIN_CORPUS_VERSION = 1
# Bytes of built-in source text per work unit.
BUILTIN_BYTES_PER_UNIT = 4 << 20
# Records of a TFDS dataset per work unit (random access makes any range cheap to read).
TFDS_RECORDS_PER_UNIT = 1 << 16
# Records fetched from a TFDS data source per read.
_TFDS_READ_BATCH = 1024


class WorkUnit(NamedTuple):
  """One independently tokenisable piece of a source.

  kind: "builtin" | "parquet" | "jsonl" | "txt" | "tfds" | "hf"
  path: absolute file path, or the dataset name for tfds/hf, "" for builtin
  name: the file's path relative to the source root (prefix of its documents' keys)
  start, stop: built-in document range, parquet row-group range or TFDS record range;
               0, 0 otherwise
  """
  kind: str
  path: str
  name: str
  start: int
  stop: int


def split_draw(key: str) -> float:
  """u = blake2b-64(key) / 2**64, uniform on [0, 1): the document with this key is in the
  validation split iff u < val_fraction."""
  digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
  return int.from_bytes(digest, "little") / 2.0**64


def is_validation(key: str, val_fraction: float) -> bool:
  """Whether the document with this key belongs to the validation split (`split_draw`)."""
  return split_draw(key) < val_fraction


# ---------------------------------------------------------------------------------------------
# Built-in corpus


def _stdlib_dir() -> Path:
  return Path(sysconfig.get_paths()["stdlib"]).resolve()


def builtin_documents() -> list[tuple[str, str]]:
  """(key, locator) of every built-in document, in a deterministic order.

  Documents: each `*.py` file of the running Python's standard library (tests included,
  third-party `site-packages` excluded), keyed "stdlib/<relative path>" and sorted; then each
  topic of `pydoc_data.topics` (the language reference sections `help()` shows), keyed
  "pydoc/<topic>" and sorted. The file `pydoc_data/topics.py` itself is left out because its
  topics are already documents. Its size depends on the Python version (see
  docs/decisions.md, 2026-11-23: the built-in corpus and its validation split).
  """
  root = _stdlib_dir()
  docs = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames
                   if d not in ("site-packages", "dist-packages", "__pycache__")]
    for filename in filenames:
      if filename.endswith(".py"):
        rel = Path(dirpath, filename).relative_to(root).as_posix()
        if rel != "pydoc_data/topics.py":
          docs.append((f"stdlib/{rel}", rel))
  docs.sort()
  topics = _pydoc_topics()
  docs.extend((f"pydoc/{name}", name) for name in sorted(topics))
  return docs


def _pydoc_topics() -> dict[str, str]:
  try:
    from pydoc_data.topics import topics
  except ImportError:  # some distributions strip pydoc_data
    return {}
  return dict(topics)


def builtin_fingerprint() -> str:
  """Hash of the built-in document list and sizes: changes when the Python install does."""
  h = hashlib.blake2b(digest_size=8)
  h.update(f"builtin corpus v{BUILTIN_CORPUS_VERSION}\n{sys.version}\n".encode())
  root = _stdlib_dir()
  topics = None
  for key, locator in builtin_documents():
    if key.startswith("stdlib/"):
      size = (root / locator).stat().st_size
    else:
      topics = topics if topics is not None else _pydoc_topics()
      size = len(topics[locator])
    h.update(f"{key}\0{size}\n".encode("utf-8", "surrogatepass"))
  return h.hexdigest()


def _builtin_units() -> list[WorkUnit]:
  root = _stdlib_dir()
  topics = _pydoc_topics()
  units, start, acc = [], 0, 0
  docs = builtin_documents()
  for i, (key, locator) in enumerate(docs):
    if key.startswith("stdlib/"):
      acc += (root / locator).stat().st_size
    else:
      acc += len(topics[locator])
    if acc >= BUILTIN_BYTES_PER_UNIT or i == len(docs) - 1:
      units.append(WorkUnit("builtin", "", "builtin", start, i + 1))
      start, acc = i + 1, 0
  return units


def _iter_builtin(unit: WorkUnit) -> Iterator[tuple[str, str]]:
  root = _stdlib_dir()
  topics = _pydoc_topics()
  for key, locator in builtin_documents()[unit.start:unit.stop]:
    if key.startswith("stdlib/"):
      # Bytes decoded as UTF-8 with replacement: a few test files are Latin-1 on purpose.
      text = (root / locator).read_bytes().decode("utf-8", errors="replace")
    else:
      text = topics[locator]
    if text:  # empty modules (many __init__.py) are not documents
      yield key, text


# ---------------------------------------------------------------------------------------------
# Local files


def _glob_root(pattern: str) -> Path:
  """The deepest directory of a glob pattern that holds no wildcard."""
  parts = Path(pattern).parts
  fixed = []
  for part in parts:
    if any(c in part for c in "*?["):
      break
    fixed.append(part)
  return Path(*fixed) if fixed else Path(".")


def resolve_files(source: str) -> tuple[Path, list[Path]]:
  """(root, files) of a file, directory (searched recursively) or glob source.

  Raises FileNotFoundError naming the path when it does not exist or holds no supported file.
  """
  if any(c in source for c in "*?["):
    matches = sorted(Path(p) for p in glob.glob(source, recursive=True))
    files = [p for p in matches if p.is_file() and p.suffix in FILE_SUFFIXES]
    if not files:
      raise FileNotFoundError(
          f"source {source!r}: the glob matches no {'/'.join(FILE_SUFFIXES)} file")
    return _glob_root(source).resolve(), [p.resolve() for p in files]
  path = Path(source).expanduser()
  if not path.exists():
    raise FileNotFoundError(f"source {source!r}: no such file or directory")
  if path.is_file():
    if path.suffix not in FILE_SUFFIXES:
      raise ValueError(f"source {source!r}: unsupported file type {path.suffix!r}; expected "
                       f"one of {FILE_SUFFIXES} (or 'builtin', 'tfds:NAME', 'hf:NAME')")
    return path.parent.resolve(), [path.resolve()]
  # Hidden entries (.cache/, .git/, partial downloads) are not part of a corpus.
  files = sorted(p for p in path.rglob("*")
                 if p.is_file() and p.suffix in FILE_SUFFIXES
                 and not any(part.startswith(".") for part in p.relative_to(path).parts))
  if not files:
    raise FileNotFoundError(
        f"source {source!r}: the directory holds no {'/'.join(FILE_SUFFIXES)} file")
  return path.resolve(), [p.resolve() for p in files]


def _parquet_units(path: Path, name: str) -> list[WorkUnit]:

  try:
    meta = pq.ParquetFile(path).metadata
  except Exception as e:  # pyarrow raises ArrowInvalid and friends for a non-parquet file
    raise ValueError(f"{path}: not a readable parquet file ({e})") from e
  columns = meta.schema.to_arrow_schema().names
  if "text" not in columns:
    raise ValueError(f"{path}: parquet file has no 'text' column (columns: {columns})")
  units, start, rows = [], 0, 0
  for g in range(meta.num_row_groups):
    rows += meta.row_group(g).num_rows
    if rows >= PARQUET_ROWS_PER_UNIT or g == meta.num_row_groups - 1:
      units.append(WorkUnit("parquet", str(path), name, start, g + 1))
      start, rows = g + 1, 0
  return units


def _iter_parquet(unit: WorkUnit) -> Iterator[tuple[str, str]]:

  pf = pq.ParquetFile(unit.path)
  names = pf.schema_arrow.names
  columns = ["text"] + (["id"] if "id" in names else [])
  row = sum(pf.metadata.row_group(g).num_rows for g in range(unit.start))
  for g in range(unit.start, unit.stop):
    table = pf.read_row_group(g, columns=columns)
    texts = table.column("text").to_pylist()
    ids = table.column("id").to_pylist() if "id" in columns else [None] * len(texts)
    for text, doc_id in zip(texts, ids):
      if text is not None and not isinstance(text, str):
        raise ValueError(f"{unit.path}: row {row}: 'text' must be a string, "
                         f"got {type(text).__name__}")
      if text:
        yield (f"id:{doc_id}" if doc_id is not None else f"{unit.name}:{row}"), text
      row += 1


def _iter_jsonl(unit: WorkUnit) -> Iterator[tuple[str, str]]:
  with open(unit.path, encoding="utf-8", errors="replace") as f:
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{unit.path}:{line_no}: not valid JSON ({e.msg})") from e
      if not isinstance(record, dict) or "text" not in record:
        raise ValueError(f"{unit.path}:{line_no}: expected a JSON object with a 'text' field")
      text = record["text"]
      if not isinstance(text, str):
        raise ValueError(f"{unit.path}:{line_no}: 'text' must be a string, "
                         f"got {type(text).__name__}")
      if text:
        doc_id = record.get("id")
        yield (f"id:{doc_id}" if doc_id is not None else f"{unit.name}:{line_no}"), text


def _decode_text_file(path: Path) -> str:
  """A txt file's text; ValueError naming it when it is binary: NUL bytes (no text format
  has them) or more than 10% of its characters undecodable as UTF-8 (a few stray bytes of
  another encoding are replaced, as elsewhere)."""
  raw = Path(path).read_bytes()
  if b"\0" in raw:
    raise ValueError(f"{path}: binary file (it contains NUL bytes); expected UTF-8 text")
  text = raw.decode("utf-8", errors="replace")
  if text.count("\ufffd") > 0.1 * max(len(text), 1):
    raise ValueError(f"{path}: not UTF-8 text (most of it does not decode); expected UTF-8 "
                     "text")
  return text


def _iter_txt(unit: WorkUnit) -> Iterator[tuple[str, str]]:
  text = _decode_text_file(unit.path)
  docs, current = [], []
  for line in text.splitlines(keepends=True):
    if line.strip() == TXT_SEPARATOR:
      docs.append("".join(current))
      current = []
    else:
      current.append(line)
  docs.append("".join(current))
  for i, doc in enumerate(docs):
    if doc.strip():
      yield f"{unit.name}:{i}", doc


# ---------------------------------------------------------------------------------------------
# Optional dataset libraries


def _require(module: str, extra: str, source: str):
  if importlib.util.find_spec(module) is None:
    raise ImportError(f"source {source!r} needs the optional package '{module}', which is not "
                      f"installed (pip install 'sophia-lambda-jax[{extra}]')")


def _tfds_source(name: str):
  """The random-access "train" split of prepared TFDS dataset `name` (never downloads)."""
  import tensorflow_datasets as tfds  # the optional `tfds` extra

  data_dir = os.environ.get("TFDS_DATA_DIR") or None
  try:
    return tfds.data_source(name, split="train", data_dir=data_dir, download=False)
  except Exception as e:  # tfds raises DatasetNotFoundError, NotImplementedError (tfrecord)...
    where = data_dir or "the default TFDS data directory (set TFDS_DATA_DIR to choose one)"
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise FileNotFoundError(
        f"source 'tfds:{name}': expected a dataset with a 'train' split prepared in "
        f"array_record format in {where} ({reason})") from None


def _tfds_units(name: str, source: str) -> list[WorkUnit]:
  n = len(_tfds_source(name))
  return [WorkUnit("tfds", name, source, start, min(start + TFDS_RECORDS_PER_UNIT, n))
          for start in range(0, n, TFDS_RECORDS_PER_UNIT)]


def _iter_tfds(unit: WorkUnit) -> Iterator[tuple[str, str]]:
  data = _tfds_source(unit.path)
  for first in range(unit.start, unit.stop, _TFDS_READ_BATCH):
    indices = range(first, min(first + _TFDS_READ_BATCH, unit.stop))
    for i, example in zip(indices, data.__getitems__(indices)):
      if "text" not in example:
        raise ValueError(f"tfds:{unit.path}: examples have no 'text' feature "
                         f"(features: {sorted(example)})")
      text = example["text"]
      text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)
      if text:
        yield f"tfds:{unit.path}:{i}", text


def _iter_hf(unit: WorkUnit) -> Iterator[tuple[str, str]]:
  os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local cache or path only
  import datasets  # the optional `hf` extra

  dataset = datasets.load_dataset(unit.path, split="train")
  if "text" not in dataset.column_names:
    raise ValueError(f"hf:{unit.path}: dataset has no 'text' column "
                     f"(columns: {dataset.column_names})")
  for i, record in enumerate(dataset):
    text = record["text"]
    if text:
      doc_id = record.get("id")
      yield (f"id:{doc_id}" if doc_id is not None else f"hf:{unit.path}:{i}"), text


# ---------------------------------------------------------------------------------------------
# Planning and iteration


def plan_units(source: str) -> list[WorkUnit]:
  """The work units of a source string (see the module docstring), in stream order."""
  if not isinstance(source, str) or not source:
    raise ValueError(f"source must be a non-empty string, got {source!r}")
  if source == "builtin":
    return _builtin_units()
  for prefix, module, extra in (("tfds:", "tensorflow_datasets", "tfds"),
                                ("hf:", "datasets", "hf")):
    if source.startswith(prefix):
      name = source[len(prefix):]
      if not name:
        raise ValueError(f"source {source!r}: expected {prefix}NAME")
      _require(module, extra, source)
      if prefix == "tfds:":
        return _tfds_units(name, source)
      return [WorkUnit(prefix[:-1], name, source, 0, 0)]
  root, files = resolve_files(source)
  units = []
  for path in files:
    name = path.relative_to(root).as_posix()
    if path.suffix == ".parquet":
      units.extend(_parquet_units(path, name))
    else:
      units.append(WorkUnit(path.suffix[1:], str(path), name, 0, 0))
  return units


_READERS = {"builtin": _iter_builtin, "parquet": _iter_parquet, "jsonl": _iter_jsonl,
            "txt": _iter_txt, "tfds": _iter_tfds, "hf": _iter_hf}


def iter_documents(unit: WorkUnit) -> Iterator[tuple[str, str]]:
  """(key, text) of every non-empty document of a work unit, in order."""
  return _READERS[unit.kind](unit)
