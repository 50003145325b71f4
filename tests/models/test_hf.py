"""HuggingFace Qwen2 checkpoints: parity with transformers, round trip, refusals."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from sophia_lambda_jax.models import hf, qwen

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 96
SEQ = 12


def _hf_config(tie: bool, **extra):
  # head_dim 8 != hidden / heads = 12 exercises the explicit head_dim field.
  return transformers.Qwen2Config(
      vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
      rope_theta=5000.0, rms_norm_eps=1e-6, tie_word_embeddings=tie, **extra)


def _randomize(model, seed):
  """Non-zero biases and norm scales, so a dropped or transposed tensor shows up."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      scale = 0.3 if (name.endswith("bias") or "norm" in name) else 0.08
      p.copy_(torch.randn(p.shape, generator=gen) * scale + (1.0 if "norm" in name else 0.0))
  return model


def _torch_logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()


@pytest.fixture(scope="module")
def ids():
  return np.random.default_rng(0).integers(0, VOCAB, size=(2, SEQ)).astype(np.int32)


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def hf_checkpoint(request, tmp_path_factory):
  tie = request.param
  model = _randomize(transformers.Qwen2ForCausalLM(_hf_config(tie)).eval(), seed=int(tie))
  path = tmp_path_factory.mktemp("tied" if tie else "untied")
  model.save_pretrained(path, safe_serialization=True)
  return path, model, tie


def test_from_hf_matches_transformers(hf_checkpoint, ids):
  path, reference, tie = hf_checkpoint
  model = hf.from_hf(path)
  assert model.config.tie_embeddings == tie
  assert model.config.rope_theta == 5000.0 and model.config.head_dim == 8
  np.testing.assert_allclose(np.asarray(model(ids)), _torch_logits(reference, ids),
                             atol=1e-4, rtol=0)


def test_from_hf_scanned_matches_transformers(hf_checkpoint, ids):
  path, reference, _ = hf_checkpoint
  model = hf.from_hf(path, scan_layers=True)
  assert model.config.scan_layers
  np.testing.assert_allclose(np.asarray(model(ids)), _torch_logits(reference, ids),
                             atol=1e-4, rtol=0)


@pytest.mark.parametrize("tie", [True, False])
def test_to_hf_round_trip_loads_in_transformers(tmp_path, ids, tie):
  config = qwen.QwenConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
                           num_kv_heads=2, head_dim=8, intermediate_size=64,
                           tie_embeddings=tie, max_seq_len=64)
  model = qwen.Qwen(config, rngs=nnx.Rngs(3))
  # Randomise biases and norms too (they initialise to 0 and 1).
  graphdef, params = qwen.split_params(model)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  params = treedef.unflatten(
      [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  model = nnx.merge(graphdef[0], params)
  expected = np.asarray(model(ids))

  # Small shards force the sharded layout with an index file.
  hf.to_hf(model, tmp_path, max_shard_bytes=20_000)
  assert (tmp_path / "model.safetensors.index.json").exists()
  mask = os.umask(0)
  os.umask(mask)
  shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
  assert len(shards) > 1 and {p.stat().st_mode & 0o777 for p in shards} == {0o666 & ~mask}
  reference = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path).eval()
  np.testing.assert_allclose(_torch_logits(reference, ids), expected, atol=1e-4, rtol=0)
  # ... and back into JAX, from the sharded files.
  np.testing.assert_allclose(np.asarray(hf.from_hf(tmp_path)(ids)), expected, atol=1e-6)


def test_bf16_checkpoint_loads(tmp_path, ids):
  reference = _randomize(transformers.Qwen2ForCausalLM(_hf_config(True)).eval(), seed=5)
  reference.to(torch.bfloat16).save_pretrained(tmp_path, safe_serialization=True)
  model = hf.from_hf(tmp_path, dtype=jnp.bfloat16)
  embedding = model.embed.embedding[...]
  assert embedding.dtype == jnp.bfloat16
  expected = reference.model.embed_tokens.weight.detach().float().numpy()
  np.testing.assert_array_equal(np.asarray(embedding, np.float32), expected)


def test_config_reads_both_rope_styles():
  base = hf.config_to_hf(qwen.get_config("qwen-tiny", rope_theta=12345.0))
  top_level = {k: v for k, v in base.items() if k != "rope_parameters"}
  nested = {k: v for k, v in base.items() if k != "rope_theta"}
  assert hf.config_from_hf(top_level).rope_theta == 12345.0
  assert hf.config_from_hf(nested).rope_theta == 12345.0
  assert hf.config_from_hf(base) == qwen.get_config("qwen-tiny", rope_theta=12345.0)


# config.json of the published Qwen/Qwen2.5-0.5B checkpoint (transformers 4.x style).
QWEN25_05B_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896,
    "initializer_range": 0.02, "intermediate_size": 4864, "max_position_embeddings": 32768,
    "max_window_layers": 24, "model_type": "qwen2", "num_attention_heads": 14,
    "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "transformers_version": "4.40.1", "use_cache": True,
    "use_mrope": False, "use_sliding_window": False, "vocab_size": 151936,
}


def test_published_qwen25_config_is_the_preset():
  assert hf.config_from_hf(QWEN25_05B_CONFIG) == qwen.get_config("qwen2.5-0.5b")
  # What we write reads back the same, and transformers accepts it.
  written = hf.config_to_hf(qwen.get_config("qwen2.5-0.5b"))
  assert hf.config_from_hf(written) == qwen.get_config("qwen2.5-0.5b")
  reference = transformers.Qwen2Config.from_dict(written)
  assert (reference.head_dim, reference.num_key_value_heads, reference.tie_word_embeddings,
          reference.rope_parameters["rope_theta"]) == (64, 2, True, 1e6)


@pytest.fixture
def good_checkpoint(hf_checkpoint, tmp_path):
  path, _, _ = hf_checkpoint
  copy = tmp_path / "ckpt"
  shutil.copytree(path, copy)
  return copy


def _edit_config(path, **changes):
  config = json.loads((path / "config.json").read_text())
  config.update(changes)
  (path / "config.json").write_text(json.dumps(config))


def _edit_tensors(path, edit):
  file = path / "model.safetensors"
  tensors = safetensors.numpy.load_file(str(file))
  edit(tensors)
  safetensors.numpy.save_file(tensors, str(file), metadata={"format": "pt"})


@pytest.mark.parametrize("changes, match", [
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "Qwen2 causal LM"),
    ({"architectures": ["Qwen2ForSequenceClassification"]}, "Qwen2 causal LM"),
    ({"use_sliding_window": True, "sliding_window": 8}, "sliding-window"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "sliding-window"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn'"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}},
     "rope type 'linear'"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_refuses_unsupported_config(good_checkpoint, changes, match):
  _edit_config(good_checkpoint, **changes)
  with pytest.raises(ValueError, match=match):
    hf.from_hf(good_checkpoint)


def test_refuses_missing_tensor(good_checkpoint):
  _edit_tensors(good_checkpoint, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
  with pytest.raises(ValueError, match=r"missing 1 tensor.*layers\.1\.self_attn\.k_proj\.bias"):
    hf.from_hf(good_checkpoint)


def test_refuses_misshaped_tensor(good_checkpoint):
  def edit(tensors):
    tensors["model.layers.0.mlp.up_proj.weight"] = np.zeros((81, 48), np.float32)
  _edit_tensors(good_checkpoint, edit)
  with pytest.raises(ValueError, match=r"up_proj\.weight.*\(81, 48\).*\(80, 48\)"):
    hf.from_hf(good_checkpoint)


def test_refuses_unexpected_tensor(good_checkpoint):
  def edit(tensors):
    tensors["model.layers.0.self_attn.q_norm.weight"] = np.ones((8,), np.float32)
  _edit_tensors(good_checkpoint, edit)
  with pytest.raises(ValueError, match="q_norm"):
    hf.from_hf(good_checkpoint)


def test_refuses_missing_files(good_checkpoint, tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    hf.from_hf(tmp_path / "nowhere")
  (good_checkpoint / "model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="safetensors"):
    hf.from_hf(good_checkpoint)
  (good_checkpoint / "config.json").unlink()
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf.from_hf(good_checkpoint)


def test_truncated_weights_are_one_line_naming_the_file(good_checkpoint, capsys):
  from sophia_lambda_jax import cli

  file = good_checkpoint / "model.safetensors"
  file.write_bytes(file.read_bytes()[:file.stat().st_size // 2])
  assert cli.main(["generate", str(good_checkpoint), "--prompt", "hi"]) == 2
  err = capsys.readouterr().err
  assert len(err.splitlines()) == 1 and f"{file} is not a readable safetensors file" in err, \
      err


def test_refuses_bad_arguments(good_checkpoint):
  with pytest.raises(ValueError, match="dtype"):
    hf.from_hf(good_checkpoint, dtype=jnp.int32)
  with pytest.raises(ValueError, match="shape"):
    hf.from_hf(good_checkpoint, intermediate_size=96)
  with pytest.raises(ValueError, match="unknown QwenConfig field"):
    hf.from_hf(good_checkpoint, hidden=3)
  (good_checkpoint / "config.json").write_text("{")
  with pytest.raises(ValueError, match="config.json is not valid JSON"):
    hf.from_hf(good_checkpoint)
