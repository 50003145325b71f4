"""prepare / slj tokenize: sources, round trip, idempotence, resumption, concurrency."""

import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sophia_lambda_jax import data
from sophia_lambda_jax.data import shards, sources

from data_helpers import expected_stream, make_documents, write_jsonl


def split_stream(out, split):
  manifest = data.load_manifest(out)
  pieces = [shards.open_shard(out / s["file"])[1] for s in manifest["splits"][split]["shards"]]
  return np.concatenate(pieces) if pieces else np.zeros(0, np.uint32)


def shard_bytes(out):
  return {p.name: p.read_bytes() for p in sorted(Path(out).glob("*-*.bin"))}


def test_jsonl_round_trip_text_to_shards_to_batches(jsonl_corpus, tmp_path):
  path, keyed = jsonl_corpus
  out = data.prepare(str(path), tmp_path / "out", val_fraction=0.3, num_workers=1,
                     progress=False)
  manifest = data.load_manifest(out)
  for split in ("train", "val"):
    want = expected_stream(keyed, 0.3, split)
    assert want.size > 0
    np.testing.assert_array_equal(split_stream(out, split), want)
    assert manifest["splits"][split]["tokens"] == want.size
  assert (manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"]
          == len(keyed))
  # Stored train counts are the histogram of the train stream.
  counts = np.load(out / manifest["counts"])
  np.testing.assert_array_equal(
      counts, np.bincount(expected_stream(keyed, 0.3, "train"), minlength=data.QWEN_VOCAB_SIZE))
  # Batches are windows of that stream, and decode back to the documents' text.
  train = expected_stream(keyed, 0.3, "train")
  batches = data.TokenBatches(out, "train", batch_size=4, seq_len=32, seed=1)
  for step in range(3):
    rows = batches.batch(step)
    assert rows.shape == (4, 33) and rows.dtype == np.int32
    for row, start in zip(rows, batches.window_starts(step)):
      np.testing.assert_array_equal(row, train[start:start + 33])
  text = data.get_tokenizer().decode(train[:train.tolist().index(data.EOS_ID)])
  assert text in [doc for _, doc in keyed]


def write_parquet(path, docs, ids=True, row_group_size=7, column="text"):
  path.parent.mkdir(parents=True, exist_ok=True)
  columns = {column: docs}
  if ids:
    columns["id"] = [f"<urn:uuid:{i:08d}>" for i in range(len(docs))]
  pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
  return path


@pytest.mark.parametrize("layout", ["directory", "glob"])
def test_fineweb_parquet_layout(tmp_path, monkeypatch, layout):
  # Published FineWeb layout: data/CC-MAIN-*/000_00000.parquet; several units per file.
  monkeypatch.setattr(sources, "PARQUET_ROWS_PER_UNIT", 10)
  docs = make_documents(40, seed=3)
  root = tmp_path / "fineweb"
  write_parquet(root / "data" / "CC-MAIN-2024-10" / "000_00000.parquet", docs[:25])
  write_parquet(root / "data" / "CC-MAIN-2024-18" / "000_00000.parquet", docs[25:])
  (root / "README.md").write_text("not a shard")
  write_parquet(root / ".cache" / "huggingface" / "stale.parquet", ["not part of the corpus"])
  source = str(root) if layout == "directory" else str(root / "data" / "CC-MAIN-*" / "*.parquet")
  units = sources.plan_units(source)
  assert len(units) > 2 and all(u.kind == "parquet" for u in units)
  out = data.prepare(source, tmp_path / "out", val_fraction=0.2, num_workers=1, progress=False)
  # FineWeb's `id` column keys the split, so it does not depend on file names.
  keyed = [(f"id:<urn:uuid:{i:08d}>", d) for i, d in enumerate(docs[:25])]
  keyed += [(f"id:<urn:uuid:{i:08d}>", d) for i, d in enumerate(docs[25:])]
  for split in ("train", "val"):
    np.testing.assert_array_equal(split_stream(out, split), expected_stream(keyed, 0.2, split))


def test_txt_files_split_on_separator_lines(tmp_path):
  docs = make_documents(6, seed=5)
  corpus = tmp_path / "txt"
  corpus.mkdir()
  (corpus / "a.txt").write_text(f"{docs[0]}\n<|endoftext|>\n{docs[1]}\n<|endoftext|>\n\n")
  (corpus / "b.txt").write_text(docs[2])
  with pytest.warns(UserWarning, match="validation split .* is empty"):
    out = data.prepare(str(corpus), tmp_path / "out", val_fraction=0.0, num_workers=1,
                       progress=False)
  keyed = [("a.txt:0", docs[0] + "\n"), ("a.txt:1", docs[1] + "\n"), ("b.txt:0", docs[2])]
  np.testing.assert_array_equal(split_stream(out, "train"), expected_stream(keyed, 0.0, "train"))
  assert data.load_manifest(out)["splits"]["train"]["documents"] == 3


def test_parallel_workers_write_the_same_bytes(tmp_path):
  docs = make_documents(80, seed=7)
  (tmp_path / "src").mkdir()
  for i in range(4):
    write_jsonl(tmp_path / "src" / f"part{i}.jsonl", docs[i * 20:(i + 1) * 20])
  serial = data.prepare(str(tmp_path / "src"), tmp_path / "serial", num_workers=1,
                        val_fraction=0.1, progress=False)
  parallel = data.prepare(str(tmp_path / "src"), tmp_path / "parallel", num_workers=2,
                          val_fraction=0.1, progress=False)
  assert len(shard_bytes(serial)) == 8
  assert shard_bytes(serial) == shard_bytes(parallel)
  np.testing.assert_array_equal(np.load(serial / "train_counts.npy"),
                                np.load(parallel / "train_counts.npy"))


def test_idempotent_and_refuses_other_settings(jsonl_corpus, tmp_path):
  path, _ = jsonl_corpus
  out = data.prepare(str(path), tmp_path / "out", val_fraction=0.1, num_workers=1,
                     progress=False)
  stamp = (out / "manifest.json").stat().st_mtime_ns
  assert data.prepare(str(path), out, val_fraction=0.1, num_workers=1, progress=False) == out
  assert (out / "manifest.json").stat().st_mtime_ns == stamp
  with pytest.raises(ValueError, match="val_fraction"):
    data.prepare(str(path), out, val_fraction=0.5, num_workers=1, progress=False)


def multi_file_source(tmp_path):
  docs = make_documents(90, seed=11)
  src = tmp_path / "src"
  src.mkdir()
  for i in range(3):
    write_jsonl(src / f"part{i}.jsonl", docs[i * 30:(i + 1) * 30])
  return src


def test_resume_after_interrupted_prepare(tmp_path, monkeypatch):
  src = multi_file_source(tmp_path)
  reference = shard_bytes(data.prepare(str(src), tmp_path / "ref", num_workers=1,
                                       val_fraction=0.1, progress=False))
  out = tmp_path / "out"

  # First attempt dies in the middle of the second file.
  real_reader = sources._READERS["jsonl"]

  def dying_reader(unit):
    for n, doc in enumerate(real_reader(unit)):
      if unit.name == "part1.jsonl" and n == 10:
        raise KeyboardInterrupt("simulated kill")
      yield doc

  monkeypatch.setitem(sources._READERS, "jsonl", dying_reader)
  with pytest.raises(KeyboardInterrupt):
    data.prepare(str(src), out, num_workers=1, val_fraction=0.1, progress=False)
  assert not (out / "manifest.json").exists()
  assert (out / "unit-00000.json").exists() and not (out / "unit-00001.json").exists()
  assert not (out / "train-00001.bin").exists()  # the half-written shard was never renamed
  with pytest.raises(FileNotFoundError, match="no manifest.json"):
    data.TokenBatches(out, "train", 2, 8)

  # Leftovers a SIGKILL would leave: a temp file; and a shard whose unit record is missing.
  (out / ".train-00001.bin.tmp").write_bytes(b"SLJTOKS\x00partial")
  (out / "train-00001.bin").write_bytes(b"garbage from an older run")
  done_stamp = (out / "train-00000.bin").stat().st_mtime_ns
  monkeypatch.setitem(sources._READERS, "jsonl", real_reader)
  data.prepare(str(src), out, num_workers=1, val_fraction=0.1, progress=False)
  assert shard_bytes(out) == reference
  assert not list(out.glob(".*.tmp"))
  assert (out / "train-00000.bin").stat().st_mtime_ns == done_stamp  # not redone


def test_resume_after_sigkill(tmp_path):
  src = multi_file_source(tmp_path)
  reference = shard_bytes(data.prepare(str(src), tmp_path / "ref", num_workers=1,
                                       val_fraction=0.1, progress=False))
  out = tmp_path / "out"
  script = textwrap.dedent(f"""
      import os, signal
      from sophia_lambda_jax import data
      from sophia_lambda_jax.data import sources
      real = sources._READERS["jsonl"]
      def reader(unit):
        for n, doc in enumerate(real(unit)):
          if unit.name == "part2.jsonl" and n == 5:
            os.kill(os.getpid(), signal.SIGKILL)
          yield doc
      sources._READERS["jsonl"] = reader
      data.prepare({str(src)!r}, {str(out)!r}, num_workers=1, val_fraction=0.1,
                   progress=False)
      """)
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
  assert proc.returncode == -9, proc.stderr
  assert list(out.glob(".*.tmp")), "the killed run should have left a temp shard"
  assert not (out / "manifest.json").exists()
  assert main_cli(["tokenize", str(src), str(out), "--val-fraction", "0.1", "--workers", "1",
                   "--no-progress"]) == 0
  assert shard_bytes(out) == reference


def _children(pid):
  """PIDs of the live processes whose parent is `pid` and that run a multiprocessing
  worker."""
  found = []
  for stat in Path("/proc").glob("[0-9]*/stat"):
    try:
      fields = stat.read_text().rsplit(")", 1)[1].split()
      cmdline = (stat.parent / "cmdline").read_bytes()
    except OSError:
      continue
    if int(fields[1]) == pid and fields[0] != "Z" and b"spawn_main" in cmdline:
      found.append(int(stat.parent.name))
  return found


def _alive(pid):
  try:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_stops_tokenize_workers_with_their_parent(tmp_path):
  import signal
  import time

  src = tmp_path / "src"
  src.mkdir()
  docs = make_documents(40)
  for name in ("a", "b"):  # two units of ~5 MB: seconds of work each
    write_jsonl(src / f"{name}.jsonl", docs * 100)
  out = tmp_path / "out"
  parent = subprocess.Popen([sys.executable, "-m", "sophia_lambda_jax.cli", "tokenize",
                             str(src), str(out), "--workers", "2", "--no-progress"],
                            stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.monotonic() + 60
    while len(list(out.glob(".train-*.bin.tmp"))) < 2 and time.monotonic() < deadline:
      time.sleep(0.02)
    workers = _children(parent.pid)
    assert len(workers) == 2 and parent.poll() is None
    parent.send_signal(signal.SIGTERM)
    status = parent.wait(timeout=15)
  finally:
    parent.kill()
  err = parent.stderr.read()
  assert status == 143, err
  assert len(err.splitlines()) == 1 and "interrupted by SIGTERM; the workers were stopped" \
      in err, err
  assert not any(_alive(pid) for pid in workers)  # stopped before the parent exited
  assert not (out / "manifest.json").exists()


def main_cli(argv):
  from sophia_lambda_jax import cli

  return cli.main(argv)


def test_concurrent_prepares_share_one_result(tmp_path):
  """wait_for_lock=True (the built-in corpus cache): the second waits, finds the result."""
  src = multi_file_source(tmp_path)
  out = tmp_path / "out"
  script = (f"from sophia_lambda_jax import data; "
            f"data.prepare({str(src)!r}, {str(out)!r}, num_workers=1, val_fraction=0.1, "
            f"progress=False, wait_for_lock=True); "
            f"print(data.load_manifest({str(out)!r})['splits']['train']['tokens'])")
  procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for _ in range(2)]
  results = [p.communicate() for p in procs]
  assert all(p.returncode == 0 for p in procs), [r[1] for r in results]
  assert results[0][0] == results[1][0] and int(results[0][0]) > 0
  reference = data.prepare(str(src), tmp_path / "ref", num_workers=1, val_fraction=0.1,
                           progress=False)
  assert shard_bytes(out) == shard_bytes(reference)


def test_cli_tokenize_reports_and_fails_cleanly(jsonl_corpus, tmp_path, capsys):
  path, _ = jsonl_corpus
  assert data.cli_tokenize([str(path), str(tmp_path / "out"), "--workers", "1",
                            "--val-fraction", "0.2", "--no-progress"]) == 0
  assert "train" in capsys.readouterr().out
  missing = tmp_path / "nowhere.jsonl"
  assert data.cli_tokenize([str(missing), str(tmp_path / "o2"), "--no-progress"]) == 2
  assert str(missing) in capsys.readouterr().err


def test_cli_tokenize_refuses_an_empty_validation_split_naming_a_fraction_that_works(
    tmp_path, capsys):
  path = write_jsonl(tmp_path / "small.jsonl", make_documents(4, seed=3))
  draws = [sources.split_draw(f"small.jsonl:{i}") for i in range(4)]
  assert min(draws) >= 0.01  # no document in a 1 % validation split
  out = tmp_path / "out"
  argv = [str(path), str(out), "--workers", "1", "--no-progress"]
  assert data.cli_tokenize(argv + ["--val-fraction", "0.01"]) == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and "validation split would be empty" in err, err
  suggested = float(err.split("--val-fraction ")[-1].split()[0])
  assert min(draws) < suggested <= max(draws)
  assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == []
  # The fraction it names works, in the same directory.
  assert data.cli_tokenize(argv + ["--val-fraction", str(suggested)]) == 0
  splits = data.load_manifest(out)["splits"]
  assert splits["val"]["documents"] >= 1 and splits["train"]["documents"] >= 1
  # One document can fill only one split: no fraction is named.
  one = write_jsonl(tmp_path / "one.jsonl", make_documents(1))
  assert data.cli_tokenize([str(one), str(tmp_path / "o1"), "--val-fraction", "0.001",
                            "--workers", "1", "--no-progress"]) == 2
  assert "no --val-fraction leaves both splits non-empty" in capsys.readouterr().err


# --- bad data: each error names the file ----------------------------------------------------


def test_missing_source_path(tmp_path):
  missing = tmp_path / "no" / "such.parquet"
  with pytest.raises(FileNotFoundError, match=str(missing)):
    data.prepare(str(missing), tmp_path / "out", progress=False)
  with pytest.raises(FileNotFoundError, match="matches no"):
    data.prepare(str(tmp_path / "*.parquet"), tmp_path / "out", progress=False)
  (tmp_path / "empty_dir").mkdir()
  with pytest.raises(FileNotFoundError, match="empty_dir.*holds no .parquet/.jsonl/.txt"):
    data.prepare(str(tmp_path / "empty_dir"), tmp_path / "out", progress=False)


def test_missing_data_dir(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "absent")):
    data.TokenBatches(tmp_path / "absent", "train", 2, 8)
  with pytest.raises(FileNotFoundError, match="no manifest.json"):
    data.resolve_data(tmp_path)


def test_empty_corpus(tmp_path):
  (tmp_path / "empty.jsonl").write_text('{"text": ""}\n\n{"text": ""}\n')
  with pytest.raises(ValueError, match="empty corpus.*empty.jsonl"):
    data.prepare(str(tmp_path / "empty.jsonl"), tmp_path / "out", num_workers=1,
                 progress=False)
  assert not (tmp_path / "out" / "manifest.json").exists()


def test_parquet_without_text_column(tmp_path):
  bad = write_parquet(tmp_path / "bad.parquet", ["a", "b"], column="content")
  with pytest.raises(ValueError, match=f"{bad}.*no 'text' column.*content"):
    data.prepare(str(bad), tmp_path / "out", progress=False)


def test_not_a_parquet_file(tmp_path):
  bad = tmp_path / "fake.parquet"
  bad.write_text("hello")
  with pytest.raises(ValueError, match=f"{bad}: not a readable parquet"):
    data.prepare(str(bad), tmp_path / "out", progress=False)


def test_jsonl_record_without_text(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "fine"}\n{"content": "no text field"}\n')
  with pytest.raises(ValueError, match=f"{bad}:2: expected a JSON object with a 'text'"):
    data.prepare(str(bad), tmp_path / "out", num_workers=1, progress=False)


def test_optional_sources_need_their_package(tmp_path, monkeypatch):
  real_find_spec = sources.importlib.util.find_spec
  monkeypatch.setattr(sources.importlib.util, "find_spec",
                      lambda name: None if name in ("datasets", "tensorflow_datasets")
                      else real_find_spec(name))
  with pytest.raises(ImportError, match=r"tensorflow_datasets.*sophia-lambda-jax\[tfds\]"):
    data.prepare("tfds:c4", tmp_path / "out", progress=False)
  with pytest.raises(ImportError, match=r"'datasets'.*sophia-lambda-jax\[hf\]"):
    data.prepare("hf:HuggingFaceFW/fineweb", tmp_path / "out", progress=False)


def test_hf_source_reads_the_text_column(tmp_path, monkeypatch):
  docs = make_documents(12, seed=13)

  class FakeDataset(list):
    column_names = ["text", "id"]

  fake = types.ModuleType("datasets")
  fake.load_dataset = lambda name, split: FakeDataset(
      {"text": d, "id": f"r{i}"} for i, d in enumerate(docs))
  monkeypatch.setitem(sys.modules, "datasets", fake)
  real_find_spec = sources.importlib.util.find_spec
  monkeypatch.setattr(sources.importlib.util, "find_spec",
                      lambda name: True if name == "datasets" else real_find_spec(name))
  monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
  out = data.prepare("hf:local/corpus", tmp_path / "out", val_fraction=0.25, num_workers=1,
                     progress=False)
  assert os.environ["HF_DATASETS_OFFLINE"] == "1"
  keyed = [(f"id:r{i}", d) for i, d in enumerate(docs)]
  np.testing.assert_array_equal(split_stream(out, "train"), expected_stream(keyed, 0.25, "train"))
  assert json.loads((out / "manifest.json").read_text())["source"] == "hf:local/corpus"


def test_bad_arguments(jsonl_corpus, tmp_path):
  path, _ = jsonl_corpus
  with pytest.raises(ValueError, match="val_fraction"):
    data.prepare(str(path), tmp_path / "out", val_fraction=1.0)
  with pytest.raises(ValueError, match="num_workers"):
    data.prepare(str(path), tmp_path / "out", num_workers=0)
  (tmp_path / "notes.md").write_text("# notes")
  with pytest.raises(ValueError, match="notes.md.*unsupported file type"):
    data.prepare(str(tmp_path / "notes.md"), tmp_path / "out")


@pytest.mark.parametrize("content", [bytes(range(256)) * 8,                      # NUL bytes
                                     bytes(range(0x80, 0x100)) * 16])          # not UTF-8
def test_tokenize_refuses_binary_input_naming_the_file(tmp_path, capsys, content):
  source = tmp_path / "blob.txt"
  source.write_bytes(content)
  assert main_cli(["tokenize", str(source), str(tmp_path / "out"), "--no-progress"]) == 2
  err = capsys.readouterr().err
  assert str(source) in err and "UTF-8 text" in err and "Traceback" not in err
  assert not (tmp_path / "out" / "manifest.json").exists()


def test_shard_overwritten_in_place_is_caught_on_first_use(jsonl_corpus, tmp_path):
  out = data.prepare(str(jsonl_corpus[0]), tmp_path / "out", val_fraction=0.1, num_workers=1,
                     progress=False)
  entry = data.load_manifest(out)["splits"]["train"]["shards"][0]
  assert entry["crc32"] == shards.payload_crc32(out / entry["file"])
  path = out / entry["file"]
  with open(path, "r+b") as f:  # same size, tokens zeroed
    f.seek(shards.HEADER_SIZE)
    f.write(bytes(path.stat().st_size - shards.HEADER_SIZE))
  batches = data.TokenBatches(out, "train", batch_size=2, seq_len=16)
  with pytest.raises(ValueError, match=f"{path}: token shard differs .*checksum"):
    batches.batch(0)
