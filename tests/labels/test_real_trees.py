"""Labels on trees built by flax itself and on published layouts: right widths and depths, or
an error naming the path; and the optimizers that use them refuse what they cannot read."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sophia_lambda_jax as slj
from sophia_lambda_jax import labels

nn = pytest.importorskip("flax.linen")
nnx = pytest.importorskip("flax.nnx")

D, HEADS, VOCAB = 16, 4, 32
IS_INFO = lambda x: isinstance(x, labels.ParamInfo)


def by_path(tree):
  return {labels.path_to_str(p): x for p, x in
          jax.tree_util.tree_flatten_with_path(tree, is_leaf=IS_INFO)[0]}


def infos(params, **kwargs):
  return {i.path: i for i in jax.tree.leaves(labels.label_params(params, **kwargs),
                                               is_leaf=IS_INFO)}


def assert_block_is_consistent(scales, info, block_prefix, attention, kernels_and_biases):
  """q/k/v/out of one block within 2x of each other; each bias has its kernel's scale."""
  attn = [float(scales[f"{block_prefix}/{attention}/{n}/kernel"])
          for n in ("query", "key", "value", "out")]
  assert max(attn) / min(attn) <= 2.0, attn
  for parent in kernels_and_biases:
    kernel, bias = f"{block_prefix}/{parent}/kernel", f"{block_prefix}/{parent}/bias"
    assert float(scales[bias]) == float(scales[kernel]), parent
    assert info[bias].dim == info[kernel].dim and info[bias].depth == info[kernel].depth


# --- flax.linen: auto-named blocks (Block_i) with MultiHeadDotProductAttention -------------


class LinenBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS)(nn.LayerNorm()(x))
    return x + nn.Dense(D)(nn.gelu(nn.Dense(4 * D)(nn.LayerNorm()(x))))


class LinenModel(nn.Module):
  num_blocks: int = 3

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, D)(tokens)
    for _ in range(self.num_blocks):
      x = LinenBlock()(x)
    return nn.Dense(VOCAB)(nn.LayerNorm()(x))


class ScanBody(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return LinenBlock()(x), None


class LinenScanned(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, D)(tokens)
    x, _ = nn.scan(ScanBody, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=3)()(x, None)
    return nn.Dense(VOCAB)(x)


TOKENS = jnp.zeros((1, 4), jnp.int32)


def linen_params(model):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), TOKENS))


def test_linen_auto_named_blocks_get_depths_and_fan_in_widths():
  params = linen_params(LinenModel())
  info = infos(params, strict=False)
  mha = "MultiHeadDotProductAttention_0"
  for i in range(3):
    block = f"params/LinenBlock_{i}"
    assert info[f"{block}/{mha}/query/kernel"].depth == i + 2
    assert info[f"{block}/{mha}/query/kernel"].role == "attention"
    assert info[f"{block}/{mha}/query/kernel"].dim == D          # (d, heads, head_dim) -> d
    assert info[f"{block}/{mha}/out/kernel"].dim == D            # (heads, head_dim, d) -> h*hd
    assert info[f"{block}/{mha}/key/bias"].dim == D              # (heads, head_dim) bias
    assert info[f"{block}/Dense_0/kernel"].depth == i + 2        # Dense_i: layers, not blocks
    assert info[f"{block}/Dense_0/kernel"].dim == 4 * D  # Dense(D) is built first: (4D, D)
    assert info[f"{block}/LayerNorm_0/scale"].role == "norm"
  assert info["params/Embed_0/embedding"].depth == 1 and info["params/Embed_0/embedding"].dim == D
  assert info["params/Dense_0/kernel"].depth == 3 + 2            # the head, outside the blocks
  scales = by_path(labels.layer_scales(params))
  depth_scales = [float(scales[f"params/LinenBlock_{i}/Dense_1/kernel"]) for i in range(3)]
  assert depth_scales[0] > depth_scales[1] > depth_scales[2]
  for i in range(3):
    assert_block_is_consistent(scales, info, f"params/LinenBlock_{i}", mha,
                               [f"{mha}/{n}" for n in ("query", "key", "value", "out")]
                               + ["Dense_0", "Dense_1"])


def test_linen_scanned_stack_has_depth_vectors():
  params = linen_params(LinenScanned())
  info = infos(params, strict=False)
  query = info["params/ScanScanBody_0/LinenBlock_0/MultiHeadDotProductAttention_0/query/kernel"]
  assert query.stacked and query.dim == D
  np.testing.assert_array_equal(query.depth, [2, 3, 4])
  out = info["params/ScanScanBody_0/LinenBlock_0/MultiHeadDotProductAttention_0/out/kernel"]
  assert out.dim == D
  assert info["params/Dense_0/kernel"].depth == 3 + 2
  scales = by_path(labels.layer_scales(params))
  assert scales["params/ScanScanBody_0/LinenBlock_0/Dense_0/kernel"].shape == (3, 1, 1)


# --- flax.nnx: a list of blocks, seen as nnx.Optimizer sees it -----------------------------


class NnxBlock(nnx.Module):
  def __init__(self, rngs):
    self.attn = nnx.MultiHeadAttention(num_heads=HEADS, in_features=D, decode=False,
                                       rngs=rngs)
    self.linear1 = nnx.Linear(D, 4 * D, rngs=rngs)
    self.linear2 = nnx.Linear(4 * D, D, rngs=rngs)
    self.norm = nnx.LayerNorm(D, rngs=rngs)


class NnxModel(nnx.Module):
  def __init__(self, rngs, num_blocks=3):
    self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
    self.blocks = nnx.List([NnxBlock(rngs) for _ in range(num_blocks)])
    self.lm_head = nnx.Linear(D, VOCAB, rngs=rngs)


def nnx_params():
  model = nnx.eval_shape(lambda: NnxModel(nnx.Rngs(0)))
  return nnx.state(model, nnx.Param)  # exactly what nnx.Optimizer(wrt=nnx.Param) passes


def test_nnx_list_of_blocks():
  params = nnx_params()
  info = infos(params, strict=False)
  for i in range(3):
    assert info[f"blocks/{i}/attn/query/kernel"].depth == i + 2
  assert info["blocks/0/attn/out/kernel"].dim == D
  assert info["blocks/0/linear2/bias"].dim == 4 * D  # linear2 kernel (4D, D): fan-in 4D
  assert info["lm_head/kernel"].depth == 5 and info["lm_head/kernel"].role == "head"
  scales = by_path(labels.layer_scales(params))
  for i in range(3):
    assert_block_is_consistent(scales, info, f"blocks/{i}", "attn",
                               ["attn/query", "attn/out", "linear1", "linear2"])
  # Roles: linear1/linear2 match no default rule, so LAVSM refuses them, naming each.
  with pytest.raises(ValueError) as excinfo:
    jax.eval_shape(slj.lavsm(learning_rate=1e-3).init, params)
  message = str(excinfo.value)
  assert "blocks/2/linear1/kernel" in message and "blocks/0/linear2/bias" in message
  assert "blocks/0/attn/query/kernel" not in message
  assert 'rules=[(r"(^|/)linear1/", "other")' in message
  tx = slj.lavsm(learning_rate=1e-3, rules=[(r"(^|/)linear[12]/", "mlp")])
  jax.eval_shape(tx.init, params)


# --- published layouts, from path and shape fixtures -----------------------------------


def nest(flat):
  tree = {}
  for path, shape in flat.items():
    node = tree
    keys = path.split("/")
    for key in keys[:-1]:
      node = node.setdefault(key, {})
    node[keys[-1]] = jax.ShapeDtypeStruct(shape, jnp.float32)
  return tree


def gpt2_hf_flax(num_blocks=2, d=768):
  flat = {"transformer/wte/embedding": (50257, d), "transformer/wpe/embedding": (1024, d),
          "transformer/ln_f/scale": (d,), "transformer/ln_f/bias": (d,)}
  for i in range(num_blocks):
    h = f"transformer/h/{i}"
    flat.update({
        f"{h}/ln_1/scale": (d,), f"{h}/ln_1/bias": (d,),
        f"{h}/attn/c_attn/kernel": (3 * d, d), f"{h}/attn/c_attn/bias": (3 * d,),
        f"{h}/attn/c_proj/kernel": (d, d), f"{h}/attn/c_proj/bias": (d,),
        f"{h}/ln_2/scale": (d,), f"{h}/ln_2/bias": (d,),
        f"{h}/mlp/c_fc/kernel": (4 * d, d), f"{h}/mlp/c_fc/bias": (4 * d,),
        f"{h}/mlp/c_proj/kernel": (d, 4 * d), f"{h}/mlp/c_proj/bias": (d,)})
  return nest(flat)


def test_gpt2_conv1d_layout_needs_its_rules():
  params = gpt2_hf_flax()
  with pytest.raises(ValueError, match=re.escape("transformer/h/1/mlp/c_fc/kernel")) as err:
    labels.layer_scales(params)
  assert "HF_FLAX_GPT2_RULES" in str(err.value)
  info = infos(params, rules=labels.HF_FLAX_GPT2_RULES)
  widths = {p: (i.role, i.depth, i.dim) for p, i in info.items() if "/h/0/" in p or "/h/" not in p}
  assert widths["transformer/h/0/attn/c_attn/kernel"] == ("attention", 2, 768)
  assert widths["transformer/h/0/attn/c_attn/bias"] == ("attention", 2, 768)
  assert widths["transformer/h/0/attn/c_proj/kernel"] == ("attention", 2, 768)
  assert widths["transformer/h/0/mlp/c_fc/kernel"] == ("mlp", 2, 768)
  assert widths["transformer/h/0/mlp/c_proj/kernel"] == ("mlp", 2, 3072)
  assert widths["transformer/wte/embedding"] == ("embedding", 1, 768)
  assert widths["transformer/ln_f/scale"] == ("norm", 4, 768)
  labels.layer_scales(params, rules=labels.HF_FLAX_GPT2_RULES)
  # A rule that also matches the biases still leaves each bias its kernel's width.
  loose = infos(params, rules=[labels.Rule(r"c_(attn|fc|proj)", fan_in=-1)])
  assert loose["transformer/h/1/attn/c_attn/bias"].dim == 768


def test_gemma_einsum_layouts_by_default():
  d, heads, kv, head_dim, hidden = 64, 8, 2, 16, 256
  flat = {"embedder/input_embedding": (1000, d), "final_norm/scale": (d,)}
  for i in range(2):
    flat.update({
        f"layer_{i}/attn/q_einsum/w": (heads, d, head_dim),
        f"layer_{i}/attn/kv_einsum/w": (2, kv, d, head_dim),
        f"layer_{i}/attn/attn_vec_einsum/w": (heads, head_dim, d),
        f"layer_{i}/mlp/gating_einsum": (2, d, hidden),
        f"layer_{i}/mlp/linear": (hidden, d),
        f"layer_{i}/pre_attention_norm/scale": (d,),
        f"layer_{i}/pre_ffw_norm/scale": (d,)})
  info = infos(nest(flat))
  got = {p: (i.role, i.depth, i.dim) for p, i in info.items() if not p.startswith("layer_1")}
  assert got == {
      "embedder/input_embedding": ("embedding", 1, d),
      "final_norm/scale": ("norm", 4, d),
      "layer_0/attn/q_einsum/w": ("attention", 2, d),
      "layer_0/attn/kv_einsum/w": ("attention", 2, d),
      "layer_0/attn/attn_vec_einsum/w": ("attention", 2, heads * head_dim),
      "layer_0/mlp/gating_einsum": ("mlp", 2, d),
      "layer_0/mlp/linear": ("mlp", 2, hidden),
      "layer_0/pre_attention_norm/scale": ("norm", 2, d),
      "layer_0/pre_ffw_norm/scale": ("norm", 2, d)}
  scales = by_path(labels.layer_scales(nest(flat)))
  q, mlp = float(scales["layer_0/attn/q_einsum/w"]), float(scales["layer_0/mlp/gating_einsum"])
  assert q == mlp and q > 0.1  # same fan-in and depth: same scale, not clamped


@pytest.mark.parametrize("path, shape", [
    ("layers/0/mixer/in_proj/kernel", (D, 2, D)),        # a DenseGeneral of unknown layout
    ("layers/0/mixer/proj/weight", (D, D)),              # torch-style (out, in) or not?
])
def test_unsettled_layouts_raise_naming_the_path(path, shape):
  params = nest({path: shape, "layers/1/mlp/kernel": (D, D)})
  with pytest.raises(ValueError, match=re.escape(path)):
    labels.layer_scales(params)
  with pytest.raises(ValueError, match=re.escape(path)):
    jax.eval_shape(slj.sophia_lambda(batch_tokens=8).init, params)
  assert infos(params, strict=False)[path].dim is None
  settled = labels.Rule(re.escape(path) + "$", fan_in=-1)
  assert infos(params, rules=[settled], strict=False)[path].dim == shape[-1]
  labels.layer_scales(params, rules=[settled])
  labels.layer_scales(params, strict=False)  # the documented escape: a shape[0] guess


def test_bad_fan_in_rules_raise():
  params = nest({"layers/0/mlp/kernel": (D, D)})
  with pytest.raises(ValueError, match="fan_in"):
    labels.label_params(params, rules=[labels.Rule("mlp", fan_in=(0, 1))])  # all axes
  with pytest.raises(ValueError, match="fan_in"):
    labels.label_params(params, rules=[labels.Rule("mlp", fan_in=5)])
  with pytest.raises(ValueError, match="fan_in"):
    labels.label_params(params, rules=[labels.Rule("mlp", fan_in="in")])
  with pytest.raises(ValueError, match="block"):
    labels.label_params(params, rules=[labels.Rule("mlp", block=-1)])
  with pytest.raises(ValueError, match="states no role"):
    labels.label_params(params, rules=[labels.Rule("mlp")])


# --- no blocks anywhere -----------------------------------------------------------------

ENCODER = {"encoder": {"foo": {"kernel": jnp.ones((D, D)), "bias": jnp.zeros(D)},
                       "bar": {"kernel": jnp.ones((D, D))}}}


def test_unknown_names_and_no_blocks_raise_at_init_and_train_with_rules():
  for tx, match in [(slj.lavsm(learning_rate=1e-3), "encoder/foo/bias"),
                    (slj.lamvs(learning_rate=1e-3), "encoder/bar/kernel"),
                    (slj.sophia_lambda(batch_tokens=8), "no indexed blocks")]:
    with pytest.raises(ValueError, match=match) as excinfo:
      tx.init(ENCODER)
    assert "encoder/foo/kernel" in str(excinfo.value)
  with pytest.raises(ValueError, match="encoder/foo/kernel"):
    slj.get_optimizer("sophia_lambda", batch_tokens=8).init(ENCODER)

  roles = [(r"^encoder/", "mlp")]
  placed = [labels.Rule(r"^encoder/foo/", block=0), labels.Rule(r"^encoder/bar/", block=1)]
  info = infos(ENCODER, rules=placed, strict=False)
  assert info["encoder/bar/kernel"].depth == 3 and info["encoder/foo/bias"].depth == 2
  kernel_only = [labels.Rule(r"^encoder/foo/kernel$", block=0), placed[1]]
  assert infos(ENCODER, rules=kernel_only, strict=False)["encoder/foo/bias"].depth == 2
  grads = jax.tree.map(jnp.ones_like, ENCODER)
  hessian_fn = lambda p: jax.tree.map(lambda x: jnp.full_like(x, 1e-3), p)
  for name, kwargs, extra in [("lavsm", {"rules": roles}, {}),
                              ("lamvs", {"rules": roles}, {}),
                              ("sophia_lambda", {"rules": placed, "batch_tokens": 8},
                               {"hessian_fn": hessian_fn})]:
    tx = slj.get_optimizer(name, learning_rate=1e-2, **kwargs)
    updates, _ = tx.update(grads, tx.init(ENCODER), ENCODER, **extra)
    new = optax.apply_updates(ENCODER, updates)
    assert all(bool(jnp.all(a != b)) for a, b in zip(jax.tree.leaves(new),
                                                     jax.tree.leaves(ENCODER))), name


def test_a_tree_of_only_embedding_and_head_needs_no_blocks():
  params = {"embed": {"embedding": jnp.ones((VOCAB, D))},
            "lm_head": {"kernel": jnp.ones((D, VOCAB))}}
  scales = labels.layer_scales(params)
  assert float(scales["embed"]["embedding"]) > float(scales["lm_head"]["kernel"])


# --- describe ------------------------------------------------------------------------------


def test_describe_shows_every_leaf_and_what_would_be_refused():
  params = nnx_params()
  text = labels.describe(params)
  assert repr(text) == str(text)  # shown as the table in a REPL or notebook
  lines = text.splitlines()
  header = next(i for i, line in enumerate(lines) if line.startswith("path"))
  assert lines[header].split() == ["path", "shape", "role", "depth", "width", "lambda",
                                   "role", "scale"]
  rows = {line.split()[0]: line.split() for line in lines[header + 2:]
          if line and not line[0].isspace() and "/" in line.split()[0]}
  assert len(rows) == len(jax.tree.leaves(params))
  scales = by_path(labels.layer_scales(params))
  q = rows["blocks/1/attn/query/kernel"]
  assert q[1:5] == [f"{D}x{HEADS}x{D // HEADS}", "attention", "3", str(D)]
  assert float(q[5]) == pytest.approx(float(scales["blocks/1/attn/query/kernel"]), abs=1e-3)
  assert q[6] == "1.8"
  assert rows["blocks/1/linear1/kernel"][2] == "?"  # no role rule
  assert "lavsm / lamvs would refuse" in text and "sophia_lambda would" not in text
  rows_order = [r for r in rows]
  assert rows_order[0] == "embed/embedding" and rows_order[-1].startswith("lm_head")

  with_rules = labels.describe(params, rules=[(r"linear", "mlp")], role_scales={"mlp": 2.0})
  assert "would refuse" not in with_rules
  assert any(line.startswith("blocks/0/linear1/kernel") and line.split()[-1] == "2"
             for line in with_rules.splitlines())

  refused = labels.describe(ENCODER)
  assert "sophia_lambda would refuse" in refused and "encoder/foo/kernel" in refused
  stacked = labels.describe(linen_params(LinenScanned()))
  assert any("2..4" in line for line in stacked.splitlines())
