"""The `tfds:` source: a dataset built locally with a TFDS GeneratorBasedBuilder in array_record
format (no TensorFlow, no download) is tokenised document by document and trained on."""

import json

import numpy as np
import pytest

from sophia_lambda_jax import cli, data
from sophia_lambda_jax.data import shards, sources

from data_helpers import expected_stream, make_documents

tfds = pytest.importorskip("tensorflow_datasets")

DOCS = make_documents(40, seed=7)


class TinyCorpus(tfds.core.GeneratorBasedBuilder):
  """40 text documents, one "train" split."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i, doc in enumerate(DOCS):
      yield i, {"text": doc}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tensorflow_datasets")
  TinyCorpus(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  return data_dir


def split_stream(out, split):
  manifest = data.load_manifest(out)
  return np.concatenate([shards.open_shard(out / s["file"])[1]
                         for s in manifest["splits"][split]["shards"]])


def test_tfds_source_tokenises_every_record_then_trains(tfds_dir, tmp_path, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tfds_dir))
  monkeypatch.setattr(sources, "TFDS_RECORDS_PER_UNIT", 16)  # 40 records -> 3 work units
  units = sources.plan_units("tfds:tiny_corpus")
  assert [(u.start, u.stop) for u in units] == [(0, 16), (16, 32), (32, 40)]

  out = data.prepare("tfds:tiny_corpus", tmp_path / "tokens", val_fraction=0.2, num_workers=2,
                     progress=False)
  # Document i is record i of the split as the builder wrote it (TFDS shuffles on write).
  records = tfds.data_source("tiny_corpus", split="train", data_dir=str(tfds_dir))
  texts = [records[i]["text"].decode() for i in range(len(records))]
  assert sorted(texts) == sorted(DOCS)
  keyed = [(f"tfds:tiny_corpus:{i}", text) for i, text in enumerate(texts)]
  for split in ("train", "val"):
    np.testing.assert_array_equal(split_stream(out, split), expected_stream(keyed, 0.2, split))

  run = tmp_path / "run"
  assert cli.main(["train", "--data", str(out), "--model", "qwen-tiny", "--optimizer",
                   "adamw", "--steps", "2", "--batch-size", "2", "--seq-len", "16",
                   "--eval-batches", "1", "--tensorboard", "false", "--out", str(run)]) == 0
  summary = json.loads((run / "summary.json").read_text())
  assert summary["steps"] == 2 and np.isfinite(summary["final_val_loss"])


def test_tfds_source_names_a_missing_dataset(tmp_path, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  with pytest.raises(FileNotFoundError,
                     match=r"tfds:no_such_corpus.*array_record format in .*\(Dataset "
                           r"no_such_corpus not found"):
    sources.plan_units("tfds:no_such_corpus")
