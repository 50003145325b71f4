"""Tests for sophia_lambda_jax.labels: roles, depths, widths and layer scales from paths."""

import math
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from sophia_lambda_jax import labels
from sophia_lambda_jax.labels import ParamInfo

IS_INFO = lambda x: isinstance(x, ParamInfo)


def infos_by_path(params, **kwargs):
  tree = labels.label_params(params, **kwargs)
  return {info.path: info for info in jax.tree.leaves(tree, is_leaf=IS_INFO)}


# --- path strings ---------------------------------------------------------------------


def test_path_to_str_joins_every_key_kind():
  tu = jax.tree_util
  keypath = (tu.DictKey("layers"), tu.SequenceKey(3), tu.GetAttrKey("attn"),
             tu.DictKey(0), tu.FlattenedIndexKey(2))
  assert labels.path_to_str(keypath) == "layers/3/attn/0/2"
  # The array inside an nnx.Variable is reached through a trailing `.value`: dropped.
  assert labels.path_to_str((tu.DictKey("w"), tu.GetAttrKey("value"))) == "w"
  # ...but only as the last key and only as an attribute, not a dict entry named "value".
  assert labels.path_to_str((tu.DictKey("value"),)) == "value"
  assert labels.path_to_str(("layers", 3, "mlp")) == "layers/3/mlp"


# --- the block index in every path style ----------------------------------------------

D, VOCAB, L = 8, 50, 3


def styled_tree(block_key, flat=False):
  """Embedding, L blocks (q_proj kernel + bias, a norm, an mlp kernel), final norm, head.

  block_key(i) gives the path prefix of block i (a tuple of keys), or, with flat=True,
  the tree is a one-level dict keyed by dotted strings (HF state-dict style).
  """
  leaves = {("embed", "embedding"): np.zeros((VOCAB, D)),
            ("final_norm", "scale"): np.zeros(D),
            ("lm_head", "kernel"): np.zeros((D, VOCAB))}
  for i in range(L):
    prefix = block_key(i)
    leaves[prefix + ("attn", "q_proj", "kernel")] = np.zeros((D, 2 * D))
    leaves[prefix + ("attn", "q_proj", "bias")] = np.zeros(2 * D)
    leaves[prefix + ("input_norm", "scale")] = np.zeros(D)
    leaves[prefix + ("mlp", "down_proj", "kernel")] = np.zeros((3 * D, D))
  if flat:
    return {".".join(str(k) for k in path): v for path, v in leaves.items()}
  tree = {}
  for path, value in leaves.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


PATH_STYLES = {
    "nnx_int_keys": lambda: styled_tree(lambda i: ("layers", i)),
    "linen_layers_i": lambda: styled_tree(lambda i: (f"layers_{i}",)),
    "linen_h_i": lambda: styled_tree(lambda i: (f"h_{i}",)),
    "linen_blocks_i": lambda: styled_tree(lambda i: (f"blocks_{i}",)),
    "hf_nested_str_digits": lambda: styled_tree(lambda i: ("model", "layers", str(i))),
    "hf_dotted_flat": lambda: styled_tree(lambda i: ("model", "layers", i), flat=True),
    "gpt2_transformer_h": lambda: styled_tree(lambda i: ("transformer", "h", i)),
    "bert_encoder_layer": lambda: styled_tree(lambda i: ("encoder", "layer", i)),
}


@pytest.mark.parametrize("style", sorted(PATH_STYLES))
def test_depth_role_dim_in_every_path_style(style):
  params = PATH_STYLES[style]()
  infos = list(infos_by_path(params).values())
  assert len(infos) == 3 + 4 * L
  seen_blocks = set()
  for info in infos:
    name = info.path
    assert not info.stacked
    if "embed" in name:
      assert (info.role, info.depth, info.dim) == ("embedding", 1, D)  # (vocab, d) -> d
    elif "final_norm" in name:
      assert (info.role, info.depth, info.dim) == ("norm", L + 2, D)
    elif "lm_head" in name:
      assert (info.role, info.depth, info.dim) == ("head", L + 2, D)
    else:
      block = int([p for p in name.replace(".", "/").replace("_", "/").split("/")
                   if p.isdigit()][0])
      seen_blocks.add(block)
      assert info.depth == block + 2, name
      # A bias has its kernel's width (fan-in D), not its own length 2 D.
      expected = {"q_proj/kernel": ("attention", D), "q_proj/bias": ("attention", D),
                  "input_norm": ("norm", D), "down_proj": ("mlp", 3 * D)}
      key = next(k for k in expected if k.replace("/", ".") in name.replace("/", "."))
      assert (info.role, info.dim) == expected[key], name
  assert seen_blocks == set(range(L))


def test_list_of_blocks_sequence_keys():
  params = {"embed": {"embedding": np.zeros((VOCAB, D))},
            "layers": [{"mlp": {"fc1": {"kernel": np.zeros((D, 4 * D))}}} for _ in range(5)],
            "ln_f": {"scale": np.zeros(D)}}
  infos = infos_by_path(params)
  assert [infos[f"layers/{i}/mlp/fc1/kernel"].depth for i in range(5)] == [2, 3, 4, 5, 6]
  assert infos["ln_f/scale"].role == "norm"
  assert infos["ln_f/scale"].depth == 5 + 2


def test_gpt2_names_roles():
  params = {"transformer": {
      "wte": np.zeros((VOCAB, D)), "wpe": np.zeros((16, D)),
      "h": {0: {"ln_1": {"scale": np.zeros(D)}, "attn": {"c_attn": {"kernel": np.zeros((D, 3 * D))},
                                                          "c_proj": {"kernel": np.zeros((D, D))}},
                "mlp": {"c_fc": {"kernel": np.zeros((D, 4 * D))},
                        "c_proj": {"kernel": np.zeros((4 * D, D))}}}},
      "ln_f": {"scale": np.zeros(D)}}}
  roles = {p: (i.role, i.depth) for p, i in infos_by_path(params).items()}
  assert roles == {
      "transformer/wte": ("embedding", 1), "transformer/wpe": ("embedding", 1),
      "transformer/h/0/ln_1/scale": ("norm", 2),
      "transformer/h/0/attn/c_attn/kernel": ("attention", 2),
      "transformer/h/0/attn/c_proj/kernel": ("attention", 2),
      "transformer/h/0/mlp/c_fc/kernel": ("mlp", 2),
      "transformer/h/0/mlp/c_proj/kernel": ("mlp", 2),
      "transformer/ln_f/scale": ("norm", 3)}


def test_leaves_outside_blocks():
  """Input-stem leaves (embedding LayerNorm) get depth 1, other outside leaves L + 2."""
  params = {"embeddings": {"LayerNorm": {"scale": np.zeros(D)},
                           "word_embeddings": np.zeros((VOCAB, D))},
            "encoder": {"layer": {i: {"attention": {"kernel": np.zeros((D, D))}}
                                  for i in range(4)}},
            "pooler": {"kernel": np.zeros((D, D))}}
  infos = infos_by_path(params, strict=False)
  assert (infos["embeddings/LayerNorm/scale"].role,
          infos["embeddings/LayerNorm/scale"].depth) == ("norm", 1)
  assert infos["embeddings/word_embeddings"].depth == 1
  assert (infos["pooler/kernel"].role, infos["pooler/kernel"].depth) == ("other", 4 + 2)


def test_no_blocks_gives_l_zero():
  infos = infos_by_path({"embed": np.zeros((VOCAB, D)), "lm_head": np.zeros((D, VOCAB))})
  assert infos["embed"].depth == 1 and infos["lm_head"].depth == 2


# --- dims ------------------------------------------------------------------------------


def test_dim_rules():
  params = {"layers": {0: {"attn": {"o_proj": {"kernel": np.zeros((16, 64))},
                                   "scalar": np.float32(1.0), "vec": np.zeros(7)}}},
            "tok_embeddings": np.zeros((1000, 24)),
            "head": {"kernel": np.zeros((24, 1000))}}
  infos = infos_by_path(params)
  assert infos["layers/0/attn/o_proj/kernel"].dim == 16  # (in, out): shape[0]
  assert infos["layers/0/attn/scalar"].dim == 1
  assert infos["layers/0/attn/vec"].dim == 7
  assert infos["tok_embeddings"].dim == 24  # embedding table (vocab, d) -> d
  assert infos["head/kernel"].dim == 24


def test_shape_dtype_structs_need_no_arrays():
  kernel = jax.ShapeDtypeStruct((5, 11), np.float32)
  params = {"layers": {i: {"mlp": {"up_proj": {"kernel": kernel}}}
                       for i in range(2)}}
  infos = infos_by_path(params)
  assert infos["layers/1/mlp/up_proj/kernel"].dim == 5
  assert infos["layers/1/mlp/up_proj/kernel"].depth == 3


# --- stacked (scanned) trees ------------------------------------------------------------

NUM_STACKED = 4


def qwen_tree(num_layers, *, scanned=False, tied=True, vocab=1024, d=64, heads=4, kv=2,
              head_dim=16, mlp=192, make=np.ones):
  """The MODEL path names of the CONTRACT, built by hand (unrolled or scanned)."""
  def block_leaf(*shape):
    return make((num_layers,) + shape) if scanned else None

  block_shapes = {
      ("attn", "q_proj", "kernel"): (d, heads * head_dim),
      ("attn", "q_proj", "bias"): (heads * head_dim,),
      ("attn", "k_proj", "kernel"): (d, kv * head_dim),
      ("attn", "k_proj", "bias"): (kv * head_dim,),
      ("attn", "v_proj", "kernel"): (d, kv * head_dim),
      ("attn", "v_proj", "bias"): (kv * head_dim,),
      ("attn", "o_proj", "kernel"): (heads * head_dim, d),
      ("mlp", "gate_proj", "kernel"): (d, mlp),
      ("mlp", "up_proj", "kernel"): (d, mlp),
      ("mlp", "down_proj", "kernel"): (mlp, d),
      ("input_norm", "scale"): (d,),
      ("post_attn_norm", "scale"): (d,),
  }

  def nest(flat):
    out = {}
    for path, value in flat.items():
      node = out
      for key in path[:-1]:
        node = node.setdefault(key, {})
      node[path[-1]] = value
    return out

  tree = {"embed": {"embedding": make((vocab, d))}, "final_norm": {"scale": make((d,))}}
  if not tied:
    tree["lm_head"] = {"kernel": make((d, vocab))}
  if scanned:
    tree["layers"] = nest({k: block_leaf(*s) for k, s in block_shapes.items()})
  else:
    tree["layers"] = {i: nest({k: make(s) for k, s in block_shapes.items()})
                      for i in range(num_layers)}
  return tree


def test_stacked_leaves_get_depth_vectors():
  infos = infos_by_path(qwen_tree(NUM_STACKED, scanned=True, tied=False))
  q = infos["layers/attn/q_proj/kernel"]
  assert q.stacked and q.role == "attention" and q.dim == 64  # shape[1] of (L, d, out)
  np.testing.assert_array_equal(q.depth, np.arange(2, NUM_STACKED + 2))
  assert infos["layers/attn/q_proj/bias"].dim == 64  # its kernel's fan-in
  assert infos["layers/mlp/down_proj/kernel"].dim == 192
  norm = infos["layers/input_norm/scale"]
  assert norm.stacked and norm.role == "norm" and norm.dim == 64
  assert infos["final_norm/scale"].depth == NUM_STACKED + 2  # L = shape[0]
  assert infos["lm_head/kernel"].depth == NUM_STACKED + 2
  assert not infos["embed/embedding"].stacked and infos["embed/embedding"].depth == 1


def test_stacked_scalar_per_block_has_dim_one():
  params = {"blocks": {"mlp": {"gain": np.ones(6)}}}
  info = infos_by_path(params)["blocks/mlp/gain"]
  assert info.stacked and info.dim == 1
  np.testing.assert_array_equal(info.depth, np.arange(2, 8))
  assert labels.layer_scales(params)["blocks"]["mlp"]["gain"].shape == (6,)


def test_stacked_and_unrolled_give_the_same_layer_scales():
  unrolled = labels.layer_scales(qwen_tree(NUM_STACKED, tied=False))
  scanned = labels.layer_scales(qwen_tree(NUM_STACKED, scanned=True, tied=False))
  q_kernel = scanned["layers"]["attn"]["q_proj"]["kernel"]
  assert q_kernel.shape == (NUM_STACKED, 1, 1) and q_kernel.dtype == np.float32
  assert scanned["layers"]["input_norm"]["scale"].shape == (NUM_STACKED, 1)
  for path, value in jax.tree_util.tree_flatten_with_path(scanned)[0]:
    path = labels.path_to_str(path)
    if path.startswith("layers/"):
      per_layer = [unrolled["layers"][i] for i in range(NUM_STACKED)]
      for key in path.split("/")[1:]:
        per_layer = [node[key] for node in per_layer]
      np.testing.assert_allclose(value.reshape(-1), np.array(per_layer), rtol=1e-6)
    else:
      node = unrolled
      for key in path.split("/"):
        node = node[key]
      np.testing.assert_allclose(value, node, rtol=1e-6)


def test_stacked_errors():
  with pytest.raises(ValueError, match=r"disagree on the number of blocks.*layers/b"):
    labels.label_params({"layers": {"a_proj": {"mlp": np.ones((3, 4))},
                                    "b": {"mlp": np.ones((5, 4))}}})
  with pytest.raises(ValueError, match="mix unrolled blocks"):
    labels.label_params({"layers": {0: {"mlp": np.ones(4)}}, "h": {"mlp": np.ones((2, 4))}})
  with pytest.raises(ValueError, match="scalars"):
    labels.label_params({"layers": {"mlp": np.float32(1.0)}})


# --- rules ------------------------------------------------------------------------------


def test_strict_lists_every_unmatched_path():
  params = {"layers": {0: {"mystery": np.ones(3), "attn": {"kernel": np.ones((3, 3))}}},
            "rope_freqs": np.ones(4), "z": {"w": np.ones(2)}}
  with pytest.raises(ValueError) as excinfo:
    labels.label_params(params)
  message = str(excinfo.value)
  for path in ("layers/0/mystery", "rope_freqs", "z/w"):
    assert path in message
  assert "layers/0/attn/kernel" not in message  # matched paths are not listed
  assert "3 parameter path(s)" in message and "rules=[" in message
  # The suggested fix names each leaf's module (or the leaf, directly under a block).
  for suggestion in ('(r"(^|/)mystery$", "other")', '(r"(^|/)rope_freqs$", "other")',
                     '(r"(^|/)z/", "other")'):
    assert suggestion in message
  loose = infos_by_path(params, strict=False)
  assert loose["rope_freqs"].role == "other" and loose["layers/0/attn/kernel"].role == "attention"


def test_user_rules_take_precedence_over_defaults():
  params = {"layers": {0: {"attn": {"q_proj": {"kernel": np.ones((2, 2))},
                                    "k_proj": {"kernel": np.ones((2, 2))}}}},
            "rope_freqs": np.ones(4)}
  infos = infos_by_path(params, rules=[(r"q_proj", "mlp"), (r"^rope_freqs$", "other")])
  assert infos["layers/0/attn/q_proj/kernel"].role == "mlp"  # beats the default attn rule
  assert infos["layers/0/attn/k_proj/kernel"].role == "attention"  # defaults still apply
  assert infos["rope_freqs"].role == "other"
  as_dict = infos_by_path(params, rules={r"q_proj": "mlp", r"rope": "other"})
  assert as_dict["layers/0/attn/q_proj/kernel"].role == "mlp"
  # A trailing catch-all replaces the defaults entirely.
  replaced = infos_by_path(params, rules=[(r"rope", "embedding"), (r".*", "other")])
  assert replaced["rope_freqs"].role == "embedding"
  assert replaced["layers/0/attn/k_proj/kernel"].role == "other"


@pytest.mark.parametrize("rules, match", [
    ([(r"x", "attn")], "role 'attn'"),
    ([(r"(", "other")], "invalid regex"),
    ([("x",)], r"\(regex, role\) pair"),
    ("x", "sequence of"),
])
def test_bad_rules_raise(rules, match):
  with pytest.raises(ValueError, match=match):
    labels.label_params({"w": np.ones(2)}, rules=rules)


def test_default_rules_cover_the_spec_names():
  expected = {"a/q_proj/kernel": "attention", "a/k_proj/w": "attention",
              "a/v_proj/w": "attention", "a/o_proj/w": "attention", "x/attn/w": "attention",
              "x/SelfAttention/w": "attention", "x/attention/w": "attention",
              "x/mlp/w": "mlp", "x/gate_proj/w": "mlp", "x/up_proj/w": "mlp",
              "x/down_proj/w": "mlp", "x/fc/w": "mlp", "x/fc2/w": "mlp",
              "embed_tokens/w": "embedding", "wte": "embedding", "x/RMSNorm_0/scale": "norm",
              "x/ln_2/scale": "norm", "lm_head/w": "head", "kiln/w": None, "fcc/w": None}
  for path, role in expected.items():
    found = next((r.role for r in labels.DEFAULT_RULES
                  if r.role is not None and re.search(r.pattern, path)), None)
    assert found == role, (path, found, role)
  assert {r.role for r in labels.DEFAULT_RULES} - {None} <= set(labels.ROLES)


# --- realistic Qwen trees -----------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
def test_qwen_tree_labels(tied):
  num_layers = 2
  infos = infos_by_path(qwen_tree(num_layers, tied=tied))  # strict: every path must match
  expected_roles = {"attn": "attention", "mlp": "mlp", "input_norm": "norm",
                    "post_attn_norm": "norm"}
  assert len(infos) == 2 + 12 * num_layers + (0 if tied else 1)
  for path, info in infos.items():
    parts = path.split("/")
    if parts[0] == "layers":
      assert info.role == expected_roles[parts[2]], path
      assert info.depth == int(parts[1]) + 2
    elif parts[0] == "embed":
      assert (info.role, info.depth, info.dim) == ("embedding", 1, 64)
    elif parts[0] == "final_norm":
      assert (info.role, info.depth, info.dim) == ("norm", num_layers + 2, 64)
    else:
      assert (path, info.role, info.depth, info.dim) == ("lm_head/kernel", "head", 4, 64)
  assert infos["layers/1/attn/k_proj/kernel"].dim == 64
  assert infos["layers/1/attn/k_proj/bias"].dim == 64  # its kernel's fan-in, not 32
  assert infos["layers/0/attn/o_proj/kernel"].dim == 64
  assert infos["layers/0/mlp/down_proj/kernel"].dim == 192


def test_labels_map_together_with_params():
  params = qwen_tree(2)
  tree = labels.label_params(params)
  roles = jax.tree.map(lambda info, p: (info.role, p.shape), tree, params, is_leaf=IS_INFO)
  assert roles["layers"][1]["mlp"]["up_proj"]["kernel"] == ("mlp", (64, 192))
  scales = labels.layer_scales(params)
  assert jax.tree.structure(scales) == jax.tree.structure(params)
  # Inside jit (params are tracers) only shapes are read; the scales broadcast onto leaves.
  scaled = jax.jit(lambda p: jax.tree.map(lambda s, x: s * x, labels.layer_scales(p), p))(params)
  np.testing.assert_allclose(scaled["layers"][1]["mlp"]["up_proj"]["kernel"],
                             scales["layers"][1]["mlp"]["up_proj"]["kernel"] * np.ones((64, 192)))


def test_qwen_134m_shapes_without_allocation():
  shapes = qwen_tree(18, scanned=True, vocab=151936, d=512, heads=8, kv=4, head_dim=64,
                     mlp=1536, make=lambda s: jax.ShapeDtypeStruct(s, np.float32))
  total = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
  assert total == 134_451_712  # qwen-134m's documented parameter count
  scales = labels.layer_scales(shapes, clip=None)
  # Each entry of a scale covers size / scale.size elements (one block of a stacked leaf).
  weighted = sum(float(s.sum()) * math.prod(x.shape) / s.size
                 for s, x in zip(jax.tree.leaves(scales), jax.tree.leaves(shapes)))
  assert weighted / total == pytest.approx(1.0, rel=1e-5)


# --- layer scales -----------------------------------------------------------------------


def reference_raw_scales():
  """sqrt(d / n) per leaf of mixed_tree(), from its hand-known depth and dim (L = 2)."""
  return {"embed": math.sqrt(16 / 1), "l0": math.sqrt(16 / 2), "l1": math.sqrt(40 / 3),
          "l1_norm": math.sqrt(40 / 3), "final": math.sqrt(16 / 4)}


def mixed_tree():
  return {"embed": {"embedding": np.ones((30, 16))},
          "layers": {0: {"mlp": {"kernel": np.ones((16, 40))}},
                     1: {"mlp": {"kernel": np.ones((40, 16))}, "norm": {"scale": np.ones(40)}}},
          "final_norm": {"scale": np.ones(16)}}


def test_layer_scale_weighted_mean_is_one_before_clamping():
  params = mixed_tree()
  raw = reference_raw_scales()
  sizes = {"embed": 480, "l0": 640, "l1": 640, "l1_norm": 40, "final": 16}
  c = sum(sizes.values()) / sum(sizes[k] * raw[k] for k in sizes)
  scales = labels.layer_scales(params, clip=None)
  got = {"embed": scales["embed"]["embedding"], "l0": scales["layers"][0]["mlp"]["kernel"],
         "l1": scales["layers"][1]["mlp"]["kernel"],
         "l1_norm": scales["layers"][1]["norm"]["scale"],
         "final": scales["final_norm"]["scale"]}
  for k in sizes:
    assert got[k].shape == () and got[k].dtype == np.float32
    assert float(got[k]) == pytest.approx(c * raw[k], rel=1e-6), k
  weighted_mean = sum(sizes[k] * float(got[k]) for k in sizes) / sum(sizes.values())
  assert weighted_mean == pytest.approx(1.0, rel=1e-6)
  explicit = labels.layer_scales(params, c=2.0, clip=None)
  assert float(explicit["layers"][0]["mlp"]["kernel"]) == pytest.approx(2 * raw["l0"], rel=1e-6)


def test_layer_scale_clamping():
  # A huge depth-1 table of width 1 dominates the weighted mean (c ~ 0.8); a wide norm of
  # the input stem (depth 1) is clamped from above, scalars deep in a 300-block stack below.
  params = {"embed": np.ones((100_000, 1)), "embed_norm": np.ones(800),
            "layers": {"mlp": {"gain": np.ones(300)}}}
  unclamped = labels.layer_scales(params, clip=None)
  clamped = labels.layer_scales(params)
  assert float(unclamped["embed_norm"]) > 10
  assert float(clamped["embed_norm"]) == pytest.approx(10.0)
  gain = unclamped["layers"]["mlp"]["gain"]
  assert gain.min() < 0.1 and gain.max() > 0.1  # the clamp bites part of the stack only
  np.testing.assert_allclose(clamped["layers"]["mlp"]["gain"], np.clip(gain, 0.1, 10.0),
                             rtol=1e-6)
  np.testing.assert_allclose(clamped["embed"], unclamped["embed"], rtol=1e-6)
  narrow = labels.layer_scales(params, clip=(0.5, 2.0))
  assert float(narrow["embed_norm"]) == pytest.approx(2.0)
  assert narrow["layers"]["mlp"]["gain"].min() == pytest.approx(0.5)


@pytest.mark.parametrize("kwargs, match", [
    ({"c": 0.0}, "c must"), ({"c": float("nan")}, "c must"), ({"c": "big"}, "c must"),
    ({"clip": (2.0, 1.0)}, "clip must"), ({"clip": (-1.0, 1.0)}, "clip must"),
    ({"clip": 3.0}, "clip must"),
])
def test_layer_scale_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    labels.layer_scales(mixed_tree(), **kwargs)


def test_layer_scales_do_not_require_matching_rules():
  scales = labels.layer_scales({"rope_freqs": np.ones(4), "layers": {0: {"mlp": np.ones((4, 4))}}})
  assert set(scales) == {"rope_freqs", "layers"}


# --- flax NNX trees and import hygiene ------------------------------------------------------


def test_nnx_state_and_pure_dict_label_alike():
  nnx = pytest.importorskip("flax.nnx")

  class Block(nnx.Module):
    def __init__(self, rngs):
      self.attn = nnx.Linear(4, 6, rngs=rngs)
      self.input_norm = nnx.RMSNorm(4, rngs=rngs)

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.embed = nnx.Embed(10, 4, rngs=rngs)
      self.layers = nnx.List([Block(rngs) for _ in range(3)])
      self.final_norm = nnx.RMSNorm(4, rngs=rngs)

  state = nnx.state(Model(nnx.Rngs(0)), nnx.Param)
  from_state = infos_by_path(state)
  from_pure = infos_by_path(nnx.to_pure_dict(state))
  assert from_state.keys() == from_pure.keys()
  assert from_state == from_pure
  assert from_state["layers/2/attn/kernel"].depth == 4
  assert from_state["final_norm/scale"].depth == 5
  assert from_state["embed/embedding"].dim == 4

  class ScannedModel(nnx.Module):  # blocks created by nnx.vmap: one stacked leaf per name
    def __init__(self, rngs):
      self.embed = nnx.Embed(10, 4, rngs=rngs)

      @nnx.split_rngs(splits=3)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def make_blocks(rngs):
        return Block(rngs)

      self.layers = make_blocks(rngs)
      self.final_norm = nnx.RMSNorm(4, rngs=rngs)

  stacked = infos_by_path(nnx.state(ScannedModel(nnx.Rngs(0)), nnx.Param))
  kernel = stacked["layers/attn/kernel"]
  assert kernel.stacked and kernel.dim == 4 and kernel.role == "attention"
  np.testing.assert_array_equal(kernel.depth, [2, 3, 4])
  assert stacked["final_norm/scale"].depth == 5



# --- role scales ------------------------------------------------------------------------


def test_role_scales_cover_every_role_and_merge_overrides():
  assert set(labels.DEFAULT_ROLE_SCALES) == set(labels.ROLES)
  merged = labels.check_role_scales({"attention": 3.0, "other": np.float32(0.5)})
  assert merged == {**labels.DEFAULT_ROLE_SCALES, "attention": 3.0, "other": 0.5}
  assert labels.check_role_scales(None) == labels.DEFAULT_ROLE_SCALES
  assert labels.DEFAULT_ROLE_SCALES["attention"] == 1.8  # overrides never touch the defaults


@pytest.mark.parametrize("role_scales, match", [
    ({"attn": 1.0}, "unknown roles \\['attn'\\]"),
    ({"mlp": 0.0}, "role_scales\\['mlp'\\] must be a finite number > 0"),
    ({"norm": math.nan}, "role_scales\\['norm'\\]"),
    ({"head": "2"}, "role_scales\\['head'\\]"),
    ({"head": True}, "role_scales\\['head'\\]"),
    ([("mlp", 1.0)], "must be a dict"),
])
def test_bad_role_scales_are_refused_naming_the_role(role_scales, match):
  with pytest.raises(ValueError, match=match):
    labels.check_role_scales(role_scales)


def test_library_does_not_import_flax():
  code = ("import sys, sophia_lambda_jax.labels, sophia_lambda_jax.hessian; "
          "bad = [m for m in sys.modules if m.split('.')[0] in ('flax', 'torch')]; "
          "assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
