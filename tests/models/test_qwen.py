"""The Flax Qwen2 model: presets, parameter layout, masking, variants, gradients, dtypes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sophia_lambda_jax.models import qwen

TINY = qwen.get_config("qwen-tiny", vocab_size=256)
_apply = jax.jit(qwen.apply, static_argnums=0)
_grad = jax.jit(jax.grad(lambda *a: _loss(*a), argnums=1), static_argnums=0)


def _ids(batch, seq, seed=0, vocab=TINY.vocab_size):
  return np.random.default_rng(seed).integers(0, vocab, size=(batch, seq)).astype(np.int32)


def _stack_layers(params, num_layers):
  """Unrolled params -> the scanned layout (layers stacked on a leading axis)."""
  layers = [params["layers"][i] for i in range(num_layers)]
  return dict(params, layers=jax.tree.map(lambda *xs: jnp.stack(xs), *layers))


def _perturbed(params, seed=1, scale=0.05):
  """Params with non-trivial biases and norm scales (they initialise to 0 and 1)."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([x + scale * jax.random.normal(k, x.shape, x.dtype)
                            for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def tiny():
  model = qwen.Qwen(TINY, rngs=nnx.Rngs(0))
  graphdef, params = qwen.split_params(model)
  return graphdef, _perturbed(params)


# ----------------------------------------------------------------------------- config


def test_preset_shapes_and_counts():
  assert set(qwen.PRESETS) == {"qwen-tiny", "qwen-cpu", "qwen-134m", "qwen2.5-0.5b"}
  c = qwen.PRESETS["qwen-134m"]
  assert (c.vocab_size, c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim,
          c.intermediate_size, c.tie_embeddings) == (151936, 512, 18, 8, 4, 64, 1536, True)
  # Independent arithmetic: embedding + L * (q, k, v with bias, o, SwiGLU, 2 norms) + norm.
  h, kv, m = 512, 4 * 64, 1536
  per_block = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * m + 2 * h
  assert qwen.count_params(c) == 151936 * h + 18 * per_block + h == 134_451_712
  assert qwen.count_params("qwen2.5-0.5b") == 494_032_768  # published Qwen2.5-0.5B size
  c = qwen.PRESETS["qwen-cpu"]
  assert (c.vocab_size, c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim,
          c.intermediate_size, c.max_seq_len) == (8192, 128, 4, 4, 2, 32, 384, 512)


@pytest.mark.parametrize("tie", [True, False])
def test_count_params_equals_allocated(tie):
  config = dataclasses.replace(TINY, tie_embeddings=tie)
  _, params = qwen.split_params(qwen.Qwen(config))
  assert qwen.count_params(config) == sum(x.size for x in jax.tree.leaves(params))


def test_get_config_errors():
  with pytest.raises(ValueError, match="qwen-134m"):
    qwen.get_config("qwen-7b")
  with pytest.raises(ValueError, match="hidden"):
    qwen.get_config("qwen-tiny", hidden=3)
  assert qwen.get_config("qwen-tiny", compute_dtype="bfloat16").compute_dtype == "bfloat16"


@pytest.mark.parametrize("overrides, match", [
    ({"num_kv_heads": 3}, "num_kv_heads"),
    ({"head_dim": 15}, "head_dim"),
    ({"compute_dtype": "float16"}, "compute_dtype"),
    ({"remat": "some"}, "remat"),
    ({"num_layers": 0}, "num_layers"),
    ({"rope_theta": -1.0}, "rope_theta"),
])
def test_invalid_config(overrides, match):
  with pytest.raises(ValueError, match=match):
    qwen.get_config("qwen-tiny", **overrides)


# ----------------------------------------------------------------------------- layout


def _paths(tree):
  return {"/".join(str(getattr(k, "key", k)) for k in path)
          for path, _ in jax.tree_util.tree_leaves_with_path(tree)}


def test_param_paths_unrolled_and_scanned():
  config = dataclasses.replace(TINY, tie_embeddings=False)
  _, unrolled = qwen.split_params(qwen.Qwen(config))
  block = {"attn/q_proj/kernel", "attn/q_proj/bias", "attn/k_proj/kernel", "attn/k_proj/bias",
           "attn/v_proj/kernel", "attn/v_proj/bias", "attn/o_proj/kernel",
           "mlp/gate_proj/kernel", "mlp/up_proj/kernel", "mlp/down_proj/kernel",
           "input_norm/scale", "post_attn_norm/scale"}
  ends = {"embed/embedding", "final_norm/scale", "lm_head/kernel"}
  assert _paths(unrolled) == ends | {f"layers/{i}/{p}" for i in (0, 1) for p in block}
  assert all(isinstance(k, int) for k in unrolled["layers"])

  _, scanned = qwen.split_params(qwen.Qwen(dataclasses.replace(config, scan_layers=True)))
  assert _paths(scanned) == ends | {f"layers/{p}" for p in block}
  stacked = _stack_layers(unrolled, config.num_layers)
  assert jax.tree.map(jnp.shape, scanned) == jax.tree.map(jnp.shape, stacked)
  assert scanned["layers"]["attn"]["q_proj"]["kernel"].shape == (2, 64, 64)


@pytest.mark.parametrize("scan", [False, True])
def test_labels_parse_model_paths(scan):
  labels = pytest.importorskip("sophia_lambda_jax.labels")
  config = dataclasses.replace(TINY, scan_layers=scan)
  params = qwen.abstract_params(config)
  infos = jax.tree.leaves(labels.label_params(params, strict=True),
                          is_leaf=lambda x: isinstance(x, labels.ParamInfo))
  by_path = {info.path: info for info in infos}
  q = by_path["layers/attn/q_proj/kernel" if scan else "layers/1/attn/q_proj/kernel"]
  assert q.role == "attention" and q.stacked == scan
  assert np.asarray(q.depth).tolist() == ([2, 3] if scan else 3)
  assert by_path["embed/embedding"].role == "embedding"


@pytest.mark.parametrize("scan", [False, True])
def test_logical_axes(scan):
  config = dataclasses.replace(TINY, scan_layers=scan, tie_embeddings=False)
  axes = qwen.logical_axes(config)
  params = qwen.abstract_params(config)

  def is_axes(x):
    return isinstance(x, tuple)

  assert jax.tree.structure(axes, is_leaf=is_axes) == jax.tree.structure(params)
  allowed = {None, "vocab", "embed", "mlp", "heads", "kv", "layers"}
  for names, leaf in zip(jax.tree.leaves(axes, is_leaf=is_axes), jax.tree.leaves(params)):
    assert len(names) == leaf.ndim and set(names) <= allowed
  layer = axes["layers"] if scan else axes["layers"][0]
  prefix = ("layers",) if scan else ()
  assert layer["attn"]["k_proj"]["kernel"] == prefix + ("embed", "kv")
  assert layer["mlp"]["down_proj"]["kernel"] == prefix + ("mlp", "embed")
  assert axes["embed"]["embedding"] == ("vocab", "embed")
  assert axes["lm_head"]["kernel"] == ("embed", "vocab")


# ----------------------------------------------------------------------------- forward


def test_apply_is_pure_and_matches_module(tiny):
  graphdef, params = tiny
  ids = _ids(2, 10)
  logits = jax.jit(qwen.apply)(graphdef, params, ids)  # graphdef as a pytree argument
  assert logits.shape == (2, 10, TINY.vocab_size) and logits.dtype == jnp.float32
  model = nnx.merge(graphdef[0], params)
  assert graphdef[1] is None  # nothing but parameters
  np.testing.assert_allclose(np.asarray(model(ids)), np.asarray(logits), atol=1e-5)


@pytest.mark.parametrize("tie", [False, True])
def test_features_are_the_logits_split_at_the_head(tie):
  """features() -> (hidden, head) with logits = hidden @ head; head is the output matrix,
  the embedding's transpose when tied (the train step differentiates this product)."""
  config = dataclasses.replace(TINY, tie_embeddings=tie)
  graphdef, params = qwen.split_params(qwen.Qwen(config, rngs=nnx.Rngs(0)))
  params = _perturbed(params)
  ids = _ids(2, 12)
  hidden, head = qwen.features(graphdef, params, ids)
  assert hidden.shape == (2, 12, config.hidden_size) and hidden.dtype == config.dtype
  want_head = params["embed"]["embedding"].T if tie else params["lm_head"]["kernel"]
  np.testing.assert_array_equal(head, want_head)
  np.testing.assert_allclose(jnp.einsum("bsd,dv->bsv", hidden, head),
                             qwen.apply(graphdef, params, ids), rtol=1e-5, atol=1e-5)


def test_causal(tiny):
  graphdef, params = tiny
  ids = _ids(1, 12)
  changed = ids.copy()
  changed[0, 7:] = (changed[0, 7:] + 1) % TINY.vocab_size
  a = _apply(graphdef, params, ids)
  b = _apply(graphdef, params, changed)
  np.testing.assert_allclose(a[:, :7], b[:, :7], atol=1e-6)
  assert np.abs(np.asarray(a[:, 7:] - b[:, 7:])).max() > 1e-3


def test_segment_positions_restart():
  segments = jnp.array([[0, 0, 0, 1, 1, 2, 2, 2, 2]])
  np.testing.assert_array_equal(qwen.segment_positions(segments),
                                [[0, 1, 2, 0, 1, 0, 1, 2, 3]])


def test_packed_documents_equal_documents_alone(tiny):
  graphdef, params = tiny
  first, second, third = _ids(1, 5, seed=1), _ids(1, 9, seed=2), _ids(1, 4, seed=3)
  packed = np.concatenate([first, second, third], axis=1)
  segments = np.repeat([[1, 2, 3]], [5, 9, 4], axis=1)
  logits = _apply(graphdef, params, packed, segment_ids=segments)
  np.testing.assert_allclose(logits[:, :5], _apply(graphdef, params, first), atol=2e-5)
  np.testing.assert_allclose(logits[:, 5:14], _apply(graphdef, params, second), atol=2e-5)
  np.testing.assert_allclose(logits[:, 14:], _apply(graphdef, params, third), atol=2e-5)
  # Without segment ids the second document sees the first: the masking is what matters.
  unmasked = _apply(graphdef, params, packed)
  assert np.abs(np.asarray(unmasked[:, 5:14] - logits[:, 5:14])).max() > 1e-3
  # Explicit positions equal to the restarting ones give the same result.
  positions = qwen.segment_positions(jnp.asarray(segments))
  explicit = _apply(graphdef, params, packed, positions=positions, segment_ids=segments)
  np.testing.assert_allclose(explicit, logits, atol=1e-6)


def test_bad_input_shapes(tiny):
  graphdef, params = tiny
  with pytest.raises(ValueError, match="input_ids"):
    _apply(graphdef, params, _ids(1, 4)[0])
  with pytest.raises(ValueError, match="segment_ids"):
    _apply(graphdef, params, _ids(1, 4), segment_ids=np.zeros((1, 5), np.int32))


def _loss(graphdef, params, ids):
  logits = _apply(graphdef, params, ids[:, :-1])
  logp = jax.nn.log_softmax(logits)
  return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean()


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_scanned_equals_unrolled(tiny, remat):
  graphdef, params = tiny
  ids = _ids(2, 16, seed=4)
  scanned_def, _ = qwen.split_params(
      qwen.Qwen(dataclasses.replace(TINY, scan_layers=True, remat=remat)))
  stacked = _stack_layers(params, TINY.num_layers)
  np.testing.assert_allclose(_apply(scanned_def, stacked, ids),
                             _apply(graphdef, params, ids), atol=1e-5)
  # Gradients agree too (remat only changes what is recomputed).
  grad_unrolled = _grad(graphdef, params, ids)
  grad_scanned = _grad(scanned_def, stacked, ids)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               _stack_layers(grad_unrolled, TINY.num_layers), grad_scanned)


def test_unrolled_remat_gradients_match(tiny):
  graphdef, params = tiny
  ids = _ids(2, 16, seed=5)
  remat_def, _ = qwen.split_params(qwen.Qwen(dataclasses.replace(TINY, remat="full")))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               _grad(graphdef, params, ids),
               _grad(remat_def, params, ids))


def test_gradients_and_hessian_vector_products_equal_plain_autodiff(tiny, monkeypatch):
  """The model's own backward passes (attention, SwiGLU) against JAX's derivatives of the
  plain expressions (dense attention scores, silu(gate) * up): gradients, and
  forward-over-reverse Hessian-vector products as Sophia-H's Hutchinson estimator takes."""
  graphdef, params = tiny
  ids = _ids(2, 16, seed=8)
  direction = _perturbed(jax.tree.map(jnp.zeros_like, params), seed=9, scale=1.0)

  def loss(p):  # not through _apply, whose jit cache outlives the monkeypatch
    logits = qwen.apply(graphdef, p, ids[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

  def derivatives():
    return jax.jit(lambda p, u: jax.jvp(jax.grad(loss), (p,), (u,)))(params, direction)

  got = derivatives()
  monkeypatch.setattr(qwen, "causal_attention", _dense_attention)
  monkeypatch.setattr(qwen, "_swiglu", lambda gate, up: jax.nn.silu(gate) * up)
  want = derivatives()
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, atol=1e-5 * np.abs(w).max() + 1e-7)


@pytest.mark.parametrize("tie", [True, False])
def test_gradients_reach_every_parameter(tie):
  config = dataclasses.replace(TINY, tie_embeddings=tie)
  graphdef, params = qwen.split_params(qwen.Qwen(config))
  grads = _grad(graphdef, params, _ids(2, 17, seed=6))
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    g = np.asarray(g)
    assert np.all(np.isfinite(g)), path
    assert np.abs(g).max() > 0, f"no gradient reaches {jax.tree_util.keystr(path)}"
  # Every sub-layer of every block is listed (none silently dropped from the tree).
  assert len(jax.tree.leaves(grads)) == 12 * config.num_layers + (2 if tie else 3)


def test_bfloat16_compute_close_to_float32(tiny):
  graphdef, params = tiny
  ids = _ids(2, 16, seed=7)
  bf16_def, bf16_params = qwen.split_params(
      qwen.Qwen(dataclasses.replace(TINY, compute_dtype="bfloat16")))
  # Parameters stay float32 under bf16 compute.
  assert {x.dtype for x in jax.tree.leaves(bf16_params)} == {jnp.dtype(jnp.float32)}
  f32 = np.asarray(_apply(graphdef, params, ids))
  bf16 = _apply(bf16_def, params, ids)
  assert bf16.dtype == jnp.float32
  diff = np.abs(np.asarray(bf16) - f32).max()
  assert diff < 2e-2, diff
  assert diff > 0  # the bf16 path really ran in bf16


# ----------------------------------------------------------------------------- attention


def _dense_attention(q, k, v, segment_ids=None):
  """The reference: every (query, key) score of the sequence, masked causally (and by
  document), softmax in float32."""
  batch, seq, heads, dim = q.shape
  k = jnp.repeat(k, heads // k.shape[2], axis=2)
  v = jnp.repeat(v, heads // v.shape[2], axis=2)
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  mask = jnp.tril(jnp.ones((seq, seq), bool))[None, None]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
  scores = jnp.where(mask, scores * dim ** -0.5, -jnp.inf)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, seq, heads * dim)


def _qkv(dtype=jnp.float32, batch=2, seq=16, heads=4, kv_heads=2, dim=8, seed=0):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(batch, seq, heads, dim)), dtype)
  k = jnp.asarray(rng.normal(size=(batch, seq, kv_heads, dim)), dtype)
  v = jnp.asarray(rng.normal(size=(batch, seq, kv_heads, dim)), dtype)
  return q, k, v


_SEGMENTS = jnp.asarray([[0] * 5 + [1] * 7 + [2] * 4, [0] * 16], jnp.int32)


@pytest.mark.parametrize("seq", [16, 10])  # 4 query chunks, and one
@pytest.mark.parametrize("segments", [False, True])
def test_causal_attention_and_its_gradient_equal_the_dense_scores(seq, segments):
  q, k, v = _qkv(seq=seq)
  segment_ids = _SEGMENTS[:, :seq] if segments else None
  weights = jnp.asarray(np.random.default_rng(1).normal(size=(2, seq, 32)), jnp.float32)

  def loss(f):
    return lambda *a: jnp.sum(weights * f(*a, segment_ids))

  got = jax.jit(qwen.causal_attention)(q, k, v, segment_ids)
  np.testing.assert_allclose(got, _dense_attention(q, k, v, segment_ids), atol=1e-5)
  grads = jax.jit(jax.grad(loss(qwen.causal_attention), argnums=(0, 1, 2)))(q, k, v)
  for g, w in zip(grads, jax.grad(loss(_dense_attention), argnums=(0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(g, w, atol=1e-5)


def test_causal_attention_gradient_is_finite_when_future_scores_overflow():
  """A key the causal mask hides may score far above the query's logsumexp (late keys that
  grew large in training): exp of that difference overflows float32, and the backward pass
  must still give zero weight to it, not inf * 0 = NaN."""
  q, k, v = _qkv(seq=16)
  ramp = jnp.linspace(0.0, 200.0, 16)[None, :, None, None]
  q, k = jnp.abs(q) + 1.0, jnp.abs(k) * ramp  # scores grow with the key's position
  weights = jnp.asarray(np.random.default_rng(1).normal(size=(2, 16, 32)), jnp.float32)

  def loss(f):
    return lambda *a: jnp.sum(weights * f(*a))

  grads = jax.jit(jax.grad(loss(qwen.causal_attention), argnums=(0, 1, 2)))(q, k, v)
  want = jax.grad(loss(_dense_attention), argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(grads, want):
    assert np.isfinite(np.asarray(g)).all()
    # Scores in the hundreds: float32 keeps about 1e-4 of them, and exp amplifies that.
    np.testing.assert_allclose(g, w, rtol=5e-3, atol=5e-3)


def test_causal_attention_hessian_vector_product_equals_the_dense_scores():
  """Forward-over-reverse (Sophia-H's H u) through the recomputing backward pass."""
  q, k, v = _qkv(seed=2)
  tangents = _qkv(seed=3)
  weights = jnp.asarray(np.random.default_rng(4).normal(size=(2, 16, 32)), jnp.float32)

  def hvp(f):
    grad = jax.grad(lambda *a: jnp.sum(weights * jnp.tanh(f(*a))), argnums=(0, 1, 2))
    return jax.jvp(grad, (q, k, v), tangents)[1]

  for g, w in zip(jax.jit(lambda: hvp(qwen.causal_attention))(), hvp(_dense_attention)):
    np.testing.assert_allclose(g, w, atol=1e-4)


def test_causal_attention_bfloat16_close_to_float32():
  q, k, v = _qkv()
  want = _dense_attention(q, k, v)
  grad = jax.jit(jax.grad(
      lambda *a: jnp.sum(qwen.causal_attention(*a).astype(jnp.float32) ** 2),
      argnums=(0, 1, 2)))
  bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  got = jax.jit(qwen.causal_attention)(*bf16)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=3e-2)
  for g, w in zip(grad(*bf16), grad(q, k, v)):
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(g, np.float32), w, atol=0.1 * np.abs(w).max())


def _attention_layers(attention, layers):
  """`layers` attention layers in sequence (the output feeds the next layer's q, k, v)."""
  def loss(x):
    for _ in range(layers):
      q = x.reshape(1, 2048, 4, 32)
      x = x + jnp.tanh(attention(q, q[:, :, :2], q[:, :, 2:])).reshape(x.shape)
    return x.sum()
  return loss


def test_causal_attention_backward_keeps_no_scores():
  """XLA's plan of the gradient through a stack of layers grows per layer by about q, k, v
  and the output (~1 MB each here), not by the layer's 42 MB of chunk scores as a backward
  pass through the softmax would keep them (the dense reference keeps 67 MB)."""
  from sophia_lambda_jax.train.loop import compiled_memory

  x = jax.ShapeDtypeStruct((1, 2048, 128), jnp.float32)

  def temp(attention, layers):
    compiled = jax.jit(jax.grad(_attention_layers(attention, layers))).lower(x).compile()
    return compiled_memory(compiled)["temp"]

  per_layer = (temp(qwen.causal_attention, 3) - temp(qwen.causal_attention, 1)) / 2
  dense = (temp(_dense_attention, 3) - temp(_dense_attention, 1)) / 2
  scores = 4 * 2048 * 2048 * 4
  assert dense > scores and per_layer < 10e6, (per_layer, dense)


@pytest.mark.parametrize("args, kernel", [
    (("auto", "gpu", jnp.bfloat16, 64, False), "cudnn"),
    (("auto", "gpu", jnp.float16, 128, False), "cudnn"),
    (("xla", "gpu", jnp.bfloat16, 64, False), "xla"),       # asked for
    (("auto", "cpu", jnp.bfloat16, 64, False), "xla"),      # not a GPU
    (("auto", "tpu", jnp.bfloat16, 64, False), "xla"),
    (("auto", "gpu", jnp.float32, 64, False), "xla"),       # cuDNN: 16-bit operands
    (("auto", "gpu", jnp.bfloat16, 64, True), "xla"),       # packed documents: a mask
    (("auto", "gpu", jnp.bfloat16, 256, False), "xla"),     # heads of at most 128
    (("auto", "gpu", jnp.bfloat16, 60, False), "xla"),      # in multiples of 8
])
def test_attention_kernel_choice(args, kernel):
  assert qwen.attention_kernel(*args) == kernel


def test_the_model_routes_its_attention_by_attention_kernel(monkeypatch):
  """With a GPU backend reported, bfloat16 layers call cuDNN's kernel (here a stand-in),
  unless the rows hold packed documents; float32 layers and attention="xla" never do."""
  calls = []

  def stand_in(q, k, v):
    calls.append(q.dtype)
    return qwen.causal_attention(q, k, v)

  monkeypatch.setattr(qwen, "cudnn_attention", stand_in)
  monkeypatch.setattr(qwen, "_cudnn_compiles", lambda *shapes: True)
  monkeypatch.setattr(qwen.jax, "default_backend", lambda: "gpu")
  ids, segments = _ids(1, 8), np.asarray([[0] * 3 + [1] * 5])

  def run(config, segment_ids=None):
    calls.clear()
    graphdef, params = qwen.split_params(qwen.Qwen(config))
    jax.eval_shape(lambda p: qwen.features(graphdef, p, ids, segment_ids=segment_ids), params)
    return list(calls)

  bf16 = dataclasses.replace(TINY, compute_dtype="bfloat16")
  assert run(bf16) == [jnp.bfloat16] * TINY.num_layers
  assert run(bf16, segments) == []
  assert run(dataclasses.replace(bf16, attention="xla")) == []
  assert run(TINY) == []
