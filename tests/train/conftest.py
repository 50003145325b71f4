"""Fixtures for the training tests: a small prepared corpus and subprocess helpers.

The corpus is a few hundred short synthetic documents written as jsonl and tokenised with
`data.prepare` (well under a second), so the tests do not depend on the built-in corpus
cache. Subprocess runs share a persistent XLA compilation cache so a restarted run does not
pay for compiling the same step twice.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from word_corpus import prepared_word_corpus


@pytest.fixture(scope="session")
def token_data(tmp_path_factory) -> Path:
  """A prepared data directory (train ~37k tokens, val ~4k tokens)."""
  return prepared_word_corpus(tmp_path_factory.mktemp("corpus"), 400, (50, 150))


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory) -> Path:
  return tmp_path_factory.mktemp("xla-cache")
