"""Small corpora written on the fly (the built-in corpus is only tokenised in test_data_builtin)."""

import pytest

from data_helpers import make_documents, write_jsonl


@pytest.fixture
def jsonl_corpus(tmp_path):
  """(path, keyed documents): 60 documents in one jsonl file."""
  docs = make_documents(60)
  path = write_jsonl(tmp_path / "corpus.jsonl", docs)
  keyed = [(f"corpus.jsonl:{i + 1}", doc) for i, doc in enumerate(docs)]
  return path, keyed
