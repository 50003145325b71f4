"""Parameter labels: path -> role, depth and width, and Sophia-Lambda's layer scales.

Optimizers that treat layers differently (LAVSM/LAMVS role scales, Sophia-Lambda's layer
scale) need to know, for every leaf of a parameter pytree, what it is and where it sits. This
module reads that from the leaf's path alone, so it works on any pytree of arrays (or of
``jax.ShapeDtypeStruct``, so ``jax.eval_shape`` trees of large models cost nothing) and never
imports a model library.

Path strings join the pytree keys with ``/``: ``{"layers": {3: {"attn": ...}}}`` gives
``"layers/3/attn/q_proj/kernel"``. The trailing ``.value`` of an ``nnx.Variable`` inside an
``nnx.State`` is dropped, so ``nnx.state(model)`` and its ``to_pure_dict()`` label alike.

For every leaf, :func:`label_params` returns a :class:`ParamInfo`:

* ``role`` in :data:`ROLES`, from regex rules on the path string (first match wins).
  :data:`DEFAULT_RULES` covers the usual names (q/k/v/o_proj, attn, attention, mlp,
  gate/up/down_proj, fc, embed, wte, norm, ln, lm_head). User ``rules`` are tried *before*
  the defaults, so one extra rule for an unusual leaf is enough; to replace the defaults
  entirely, end your rules with a catch-all such as ``(r".*", "other")``.
* ``depth`` n_l, the 1-based position of the leaf in the network (n_l of the Sophia-Lambda
  paper, eq. 2, which leaves the counting open; this module fixes it): the embedding is 1,
  transformer block i (0-based) is i + 2, and the final norm and head are L + 2, where L
  is the number of blocks in the tree. Blocks are found from a layer container component
  (one of :data:`BLOCK_CONTAINERS`) followed by an integer index (``layers/3``,
  ``model.layers.3``, ``h/0``) or carrying it as a suffix (linen ``layers_3``, ``h_3``,
  ``blocks_3``); L is the largest index + 1. A container *not* followed by an index
  (``layers/attn/q_proj/kernel``) marks a stacked (scanned) leaf holding all L blocks along
  axis 0; its depth is the vector ``[2, ..., L + 1]`` and L is its ``shape[0]``.
  Leaves outside the blocks: depth 1 if the role is ``embedding`` or the path names an
  embedding (an embedding LayerNorm, say, belongs to the input stem); every other leaf
  outside the blocks (final norm, head, and anything else, e.g. a pooler) is treated as part
  of the output side and gets L + 2.
* ``dim`` d_l, the leaf's width: ``shape[0]`` (fan-in in the flax ``(in, out)`` kernel
  layout) for ndim >= 2, except embedding tables ``(vocab, d)`` which use d; ``shape[0]``
  for vectors; 1 for scalars. Stacked leaves use the per-block shape ``shape[1:]``.

:func:`layer_scales` turns depth and dim into lambda_l = c * sqrt(d_l / n_l) (Sophia-Lambda
paper, eq. 2; the paper does not fix c), with c chosen so that the parameter-count-weighted
mean of lambda over all leaves is 1, then clamped to ``clip``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

ROLES: tuple[str, ...] = ("embedding", "attention", "mlp", "norm", "head", "other")

# Path components that hold the transformer blocks (``layers/3``, ``h_3``, ``blocks/0``).
BLOCK_CONTAINERS: tuple[str, ...] = ("layers", "blocks", "h", "layer")

# (regex on the path string, role); the first match wins. Norms come first so that
# ``attn/q_norm`` or ``embeddings/LayerNorm`` are norms, then head and embedding (model
# ends), then the two kinds of block sub-layers. ``[/._]`` delimits a whole name so that,
# e.g., ``ln`` matches ``ln_f`` but not ``kiln``.
DEFAULT_RULES: tuple[tuple[str, str], ...] = (
    (r"(?i)norm|(^|[/._])ln(_?\d+|_?f)?([/._]|$)", "norm"),
    (r"(?i)(^|[/._])(lm_head|head|unembed|classifier)([/._]|$)", "head"),
    (r"(?i)embed|(^|[/._])(wte|wpe|tok_emb|pos_emb)([/._]|$)", "embedding"),
    (r"(?i)attn|attention|(^|[/._])(q|k|v|o|qkv)_proj([/._]|$)", "attention"),
    (r"(?i)mlp|ffn|feed_?forward|(^|[/._])(gate|up|down|gate_up)_proj([/._]|$)"
     r"|(^|[/._])(c_)?fc\d*([/._]|$)", "mlp"),
)

# A path that names the input embedding; such leaves outside the blocks get depth 1.
_INPUT_STEM = re.compile(r"(?i)embed|(^|[/._])(wte|wpe|tok_emb|pos_emb)([/._]|$)")
_CONTAINER_SUFFIX = re.compile(
    r"^(" + "|".join(BLOCK_CONTAINERS) + r")_(\d+)$")


class ParamInfo(NamedTuple):
  """What a parameter leaf is, read from its path.

  Attributes:
    path: the leaf's path string, e.g. ``"layers/3/attn/q_proj/kernel"``.
    role: one of :data:`ROLES`.
    depth: n_l, 1-based position in the network (int), or an int vector of length L for a
      stacked leaf (one entry per block along axis 0).
    dim: d_l, the leaf's width (fan-in; the model width for embedding tables).
    stacked: True when the leaf holds all L blocks along axis 0 (scanned layers).

  ParamInfo is a NamedTuple, hence a pytree node for jax: map over params and labels with
  ``jax.tree.map(f, params, labels, is_leaf=lambda x: isinstance(x, ParamInfo))``.
  """
  path: str
  role: str
  depth: int | np.ndarray
  dim: int
  stacked: bool


def _key_to_str(key: Any) -> str:
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return key.name
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  return str(key)  # Plain str/int components, as in nnx flat-state paths.


def path_to_str(keypath: Sequence[Any]) -> str:
  """Joins a jax key path (or a tuple of str/int keys) into ``"layers/3/attn/q_proj/kernel"``.

  A trailing ``GetAttrKey('value')`` (the array inside an ``nnx.Variable`` when an
  ``nnx.State`` is flattened) is dropped so both NNX views of a model give the same path.
  """
  keys = list(keypath)
  if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
    keys = keys[:-1]
  return "/".join(_key_to_str(k) for k in keys)


def _compile_rules(rules) -> list[tuple[re.Pattern, str, str]]:
  """User rules (tried first) followed by DEFAULT_RULES, compiled and validated."""
  if rules is None:
    user = []
  elif isinstance(rules, Mapping):
    user = list(rules.items())
  elif isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence):
    raise ValueError(
        f"rules must be a sequence of (regex, role) pairs or a dict regex -> role, got "
        f"{rules!r}")
  else:
    user = list(rules)
  compiled = []
  for rule in user + list(DEFAULT_RULES):
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
      raise ValueError(f"rules: each rule must be a (regex, role) pair, got {rule!r}")
    pattern, role = rule
    if role not in ROLES:
      raise ValueError(f"rules: role {role!r} of rule {pattern!r} is not one of {ROLES}")
    try:
      compiled.append((re.compile(pattern), pattern, role))
    except re.error as e:
      raise ValueError(f"rules: invalid regex {pattern!r}: {e}") from None
  return compiled


def _block_position(path: str) -> tuple[str, int | None]:
  """('unrolled', i) for block i, ('stacked', None), or ('outside', None).

  The outermost layer container decides: ``layers/3/...`` or ``layers_3/...`` is block 3,
  ``layers/attn/...`` (container not followed by an index) is a stacked leaf.
  """
  parts = re.split(r"[/.]", path)
  for i, part in enumerate(parts):
    match = _CONTAINER_SUFFIX.match(part)
    if match:
      return "unrolled", int(match.group(2))
    if part in BLOCK_CONTAINERS and i + 1 < len(parts):
      if parts[i + 1].isdigit():
        return "unrolled", int(parts[i + 1])
      return "stacked", None
  return "outside", None


def _leaf_shape(leaf) -> tuple[int, ...]:
  shape = getattr(leaf, "shape", None)
  return tuple(np.shape(leaf) if shape is None else shape)


def _leaf_dim(shape: tuple[int, ...], role: str) -> int:
  """d_l from a (per-block) shape: fan-in, the model width for embeddings, 1 for scalars."""
  if len(shape) == 0:
    return 1
  if len(shape) >= 2 and role == "embedding":
    return int(shape[-1])
  return int(shape[0])


def _unmatched_error(paths: list[str]) -> ValueError:
  listing = "\n".join(f"  {p}" for p in paths)
  example = re.escape(paths[0])
  return ValueError(
      f"label_params: no role rule matched {len(paths)} parameter path(s):\n{listing}\n"
      f"Add a rule (regex on the path string, tried before DEFAULT_RULES, first match "
      f"wins; role one of {ROLES}), e.g.\n"
      f"  label_params(params, rules=[(r\"{example}\", \"other\")])\n"
      f"or pass strict=False to label unmatched leaves 'other'.")


def label_params(params, rules=None, strict: bool = True):
  """Labels every leaf of ``params`` with a :class:`ParamInfo` (role, depth, dim).

  Args:
    params: a pytree of arrays (or ``jax.ShapeDtypeStruct``): pure dicts from NNX
      (integer keys), linen trees (``layers_3``), HuggingFace-style dotted keys
      (``model.layers.3.mlp...``), or stacked (scanned) trees.
    rules: extra ``(regex, role)`` pairs (or a dict regex -> role), matched with
      ``re.search`` against the path string and tried before :data:`DEFAULT_RULES`; the
      first match wins.
    strict: if True, a leaf no rule matches raises ``ValueError`` listing every such path;
      if False it is labelled ``"other"``.

  Returns:
    A pytree with the structure of ``params`` whose leaves are ParamInfo (see ParamInfo on
    mapping over it together with ``params``).

  Raises:
    ValueError: unmatched paths (strict), bad rules, a tree that mixes stacked and
      unrolled blocks, or stacked leaves that disagree on the number of blocks.
  """
  compiled = _compile_rules(rules)
  leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)

  entries, unmatched = [], []
  for keypath, leaf in leaves_with_paths:
    path = path_to_str(keypath)
    role = next((r for regex, _, r in compiled if regex.search(path)), None)
    if role is None:
      unmatched.append(path)
      role = "other"
    kind, index = _block_position(path)
    entries.append((path, role, kind, index, _leaf_shape(leaf)))
  if unmatched and strict:
    raise _unmatched_error(unmatched)

  num_blocks = _count_blocks(entries)
  infos = []
  for path, role, kind, index, shape in entries:
    if kind == "stacked":
      depth = np.arange(2, num_blocks + 2, dtype=np.int32)
      dim = _leaf_dim(shape[1:], role)
    else:
      if kind == "unrolled":
        depth = index + 2
      elif role == "embedding" or _INPUT_STEM.search(path):
        depth = 1
      else:
        depth = num_blocks + 2
      dim = _leaf_dim(shape, role)
    infos.append(ParamInfo(path, role, depth, dim, kind == "stacked"))
  return jax.tree_util.tree_unflatten(treedef, infos)


def _count_blocks(entries) -> int:
  """L: max block index + 1 for unrolled trees, the common shape[0] for stacked ones."""
  unrolled = [index for _, _, kind, index, _ in entries if kind == "unrolled"]
  stacked = {path: shape for path, _, kind, _, shape in entries if kind == "stacked"}
  if unrolled and stacked:
    raise ValueError(
        "label_params: params mix unrolled blocks (e.g. layers/0/...) and stacked blocks "
        f"(e.g. {next(iter(stacked))}); depth is ambiguous. Stacked paths: {sorted(stacked)}")
  if stacked:
    scalars = [p for p, s in stacked.items() if len(s) == 0]
    if scalars:
      raise ValueError(
          f"label_params: {scalars} sit under a layer container without a block index, so "
          "they are read as stacked (scanned) leaves, but they are scalars; stacked leaves "
          "need the block axis first.")
    lengths = {s[0] for s in stacked.values()}
    if len(lengths) > 1:
      listing = ", ".join(f"{p}: {s}" for p, s in sorted(stacked.items()))
      raise ValueError(
          "label_params: stacked (scanned) leaves disagree on the number of blocks "
          f"(shape[0] in {sorted(lengths)}): {listing}")
    return lengths.pop()
  return max(unrolled) + 1 if unrolled else 0


def _parse_clip(clip) -> tuple[float, float] | None:
  if clip is None:
    return None
  try:
    low, high = (float(x) for x in clip)
  except (TypeError, ValueError):
    raise ValueError(f"clip must be a pair (low, high) or None, got {clip!r}") from None
  if not (math.isfinite(low) and math.isfinite(high) and 0.0 <= low <= high):
    raise ValueError(f"clip must satisfy 0 <= low <= high (finite), got {clip!r}")
  return low, high


def layer_scales(params, c: float | None = None, rules=None,
                 clip: tuple[float, float] | None = (0.1, 10.0)):
  """Sophia-Lambda layer scales lambda_l = clamp(c * sqrt(d_l / n_l), *clip) per leaf.

  d_l and n_l are the ``dim`` and ``depth`` of :func:`label_params` (Sophia-Lambda paper,
  eq. 2: "d_l is layer dimension and n_l is position in network"). With ``c=None``, c
  normalises the parameter-count-weighted mean over all leaves (each block of a stacked leaf
  counted separately) to 1::

      c = sum_l size_l / sum_l size_l * sqrt(d_l / n_l)

  and the clamp is applied after that, so the clamped mean may differ slightly from 1.

  Only depth and dim are used, and roles matter only through them (embedding width and
  depth 1), so leaves no rule matches are labelled "other" here instead of raising.

  Args:
    params: pytree of arrays or ``jax.ShapeDtypeStruct`` (only shapes are read).
    c: the scale constant; None for the normalised default. Must be finite and > 0.
    rules: extra role rules, as in :func:`label_params`.
    clip: ``(low, high)`` clamp, or None for no clamp.

  Returns:
    A pytree like ``params`` of float32 numpy arrays: 0-d per leaf, or shape
    ``(L,) + (1,) * (ndim - 1)`` for stacked leaves, broadcastable to the leaf.
  """
  bounds = _parse_clip(clip)
  if c is not None:
    try:
      c_value = float(c)
    except (TypeError, ValueError):
      c_value = math.nan
    if not (math.isfinite(c_value) and c_value > 0):
      raise ValueError(f"c must be a finite number > 0 or None, got {c!r}")
    c = c_value
  labels = label_params(params, rules=rules, strict=False)
  is_info = lambda x: isinstance(x, ParamInfo)
  infos = jax.tree.leaves(labels, is_leaf=is_info)
  shapes = [_leaf_shape(x) for x in jax.tree.leaves(params)]

  raw, weights = [], []
  for info, shape in zip(infos, shapes):
    per_block_size = math.prod(shape[1:]) if info.stacked else math.prod(shape)
    depth = np.asarray(info.depth, dtype=np.float64)
    raw.append(np.sqrt(info.dim / depth))
    weights.append(np.full(depth.shape, float(per_block_size)))
  if c is None:
    total = sum(float(w.sum()) for w in weights)
    if total == 0:
      raise ValueError("layer_scales: params hold no elements; cannot normalise c")
    c = total / sum(float((w * r).sum()) for w, r in zip(weights, raw))

  scales = []
  for info, shape, r in zip(infos, shapes, raw):
    value = c * r
    if bounds is not None:
      value = np.clip(value, *bounds)
    if info.stacked:
      value = value.reshape((-1,) + (1,) * (len(shape) - 1))
    scales.append(np.asarray(value, dtype=np.float32))
  return jax.tree_util.tree_unflatten(jax.tree.structure(params), scales)
