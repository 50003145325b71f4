"""Parameter labels: path and shape -> role, depth and width; Sophia-Lambda's layer scales and
LAVSM's role scales.

Optimizers that treat layers differently (LAVSM/LAMVS role scales, Sophia-Lambda's layer
scale) need to know, for every leaf of a parameter pytree, what it is and where it sits. This
module reads that from the leaf's path and shape alone, so it works on any pytree of arrays
(or of ``jax.ShapeDtypeStruct``, so ``jax.eval_shape`` trees of large models cost nothing)
and never imports a model library. Look before training: ``print(describe(params))``.

Path strings join the pytree keys with ``/``: ``{"layers": {3: {"attn": ...}}}`` gives
``"layers/3/attn/q_proj/kernel"``. The trailing ``.value`` of an ``nnx.Variable`` inside an
``nnx.State`` is dropped, so ``nnx.state(model)`` and its ``to_pure_dict()`` label alike.

For every leaf, :func:`label_params` returns a :class:`ParamInfo`:

* ``role`` in :data:`ROLES`, from the first :class:`Rule` whose regex matches the path.
  :data:`DEFAULT_RULES` covers the usual names (q/k/v/o_proj, query/key/value, attn,
  attention, mlp, gate/up/down_proj, fc, embed, wte, norm, ln, lm_head). User ``rules`` are
  tried *before* the defaults, so one extra rule for an unusual name is enough; to replace
  the defaults entirely, end your rules with a catch-all such as ``(r".*", "other")``.
* ``depth`` n_l, the 1-based position of the leaf in the network (n_l of the Sophia-Lambda
  paper, eq. 2, which leaves the counting open; this module fixes it): the embedding is 1,
  block i (0-based) is i + 2, and the final norm and head are L + 2, where L is the number
  of blocks. The blocks are found under any common naming, the outermost match on the
  path deciding:

  - a container of :data:`BLOCK_CONTAINERS` followed by an index (``layers/3``,
    ``model.layers.3``, ``h/0``, nnx ``blocks/0``) or carrying it as a suffix (linen
    ``layers_3``, ``h_3``);
  - a group of at least two siblings ``<Name>_<i>`` (linen auto names ``Block_3``,
    ``TransformerBlock_3``) or ``<i>`` (a list) that each hold submodules, not only
    leaves: ``Dense_0``/``Dense_1`` inside a block hold their kernels directly and are
    layers of that block, not blocks;
  - a container not followed by an index (``layers/attn/q_proj/kernel``), or a linen
    ``nn.scan`` module (``ScanBlock_0``), marks a stacked (scanned) leaf holding all L
    blocks along axis 0; its depth is the vector ``[2, ..., L + 1]`` and L its ``shape[0]``;
  - a rule's ``block`` (an index, or ``"stacked"``) for any other layout.

  Leaves outside the blocks: depth 1 if the role is ``embedding`` or the path names an
  embedding (an embedding LayerNorm belongs to the input stem); every other leaf outside
  the blocks (final norm, head, a pooler) is on the output side and gets L + 2.
* ``dim`` d_l, the layer's width: its fan-in, the number of inputs the layer contracts
  over, read from the per-block shape (``shape[1:]`` for stacked leaves):

  - a rule's ``fan_in`` axes when one matches (the product of those axis lengths);
  - embedding tables ``(vocab, d)`` -> d;
  - 2-d kernels: ``shape[0]``, the ``(in, out)`` layout of flax ``Dense``/``nnx.Linear``;
  - kernels of 3 or more axes: no default, because the layout depends on the layer
    (``DenseGeneral`` q/k/v ``(d, heads, head_dim)`` contract axis 0, its output
    projection ``(heads, head_dim, d)`` axes 0 and 1). :data:`DEFAULT_RULES` settle flax's
    attention (``query``/``key``/``value``/``out``) and Gemma's einsums; other layouts
    need a rule. Names known in two layouts (:data:`AMBIGUOUS_LAYOUTS`: GPT-2 ``Conv1D``
    names, torch-style ``weight``) need one too;
  - a bias (``bias``, ``b``) has the width and depth of its sibling ``kernel``/``weight``/
    ``w`` (the same layer), whatever rules match it; without one, its own size; other
    vectors ``shape[0]``; scalars 1.

  A width that cannot be settled is ``None``; :func:`layer_scales` then raises naming the
  path (``label_params`` itself only needs roles).

:func:`layer_scales` turns depth and dim into lambda_l = c * sqrt(d_l / n_l) (Sophia-Lambda
paper, eq. 2; the paper does not fix c), with c chosen so that the parameter-count-weighted
mean of lambda over all leaves is 1, then clamped to ``clip``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Optional, Union

import jax
import numpy as np

ROLES: tuple[str, ...] = ("embedding", "attention", "mlp", "norm", "head", "other")

# Role scales s_role of LAVSM (Table/eq. 1 of the LAVSM paper). "head" and "other" are not in
# the paper; 1.0 leaves them unscaled. LAMVS reuses them (docs/design.md section 2.5).
DEFAULT_ROLE_SCALES = {
    "attention": 1.8,
    "mlp": 1.2,
    "embedding": 1.0,
    "norm": 0.7,
    "head": 1.0,
    "other": 1.0,
}

# Path components that hold the transformer blocks (``layers/3``, ``h_3``, ``blocks/0``).
BLOCK_CONTAINERS: tuple[str, ...] = ("layers", "blocks", "h", "layer")

# The value of ``Rule.block`` for a leaf that holds all blocks along axis 0.
STACKED = "stacked"

FanIn = Union[int, tuple[int, ...], slice]


class Rule(NamedTuple):
  """What a regex on the path string says about the leaves it matches.

  Attributes:
    pattern: regex, matched with ``re.search`` against the path string.
    role: one of :data:`ROLES`, or None to leave the role to later rules.
    fan_in: the axes the layer contracts over (its inputs), as axes of the per-block shape:
      an int, a tuple of ints (negative ones count from the end) or a slice
      (``slice(None, -1)``: every axis but the last). d_l is the product of their lengths.
      None leaves the width to later rules and the shape defaults.
    block: the 0-based block index of the matched leaves, or :data:`STACKED` for leaves
      that hold all blocks along axis 0; None to find blocks from the path.

  Each of role, fan_in and block comes from the first matching rule that states it, so a
  rule may state one of them only: ``Rule(r"c_attn/kernel$", fan_in=-1)``. A plain tuple
  ``(pattern, role)`` or ``(pattern, role, fan_in[, block])`` is read as a Rule.
  """
  pattern: str
  role: Optional[str] = None
  fan_in: Optional[FanIn] = None
  block: Optional[Union[int, str]] = None


# Roles. Norms come first so that ``attn/q_norm`` or ``embeddings/LayerNorm`` are norms, then
# head and embedding (model ends), then the two kinds of block sub-layers. ``[/._]``
# delimits a whole name so that, e.g., ``ln`` matches ``ln_f`` but not ``kiln``.
ROLE_RULES: tuple[Rule, ...] = (
    Rule(r"(?i)norm|(^|[/._])ln(_?\d+|_?f)?([/._]|$)", "norm"),
    Rule(r"(?i)(^|[/._])(lm_head|head|unembed|classifier)([/._]|$)", "head"),
    Rule(r"(?i)embed|(^|[/._])(wte|wpe|tok_emb|pos_emb)([/._]|$)", "embedding"),
    Rule(r"(?i)attn|attention|(^|[/._])((q|k|v|o|qkv)_proj|query|key|value)([/._]|$)",
         "attention"),
    Rule(r"(?i)mlp|ffn|feed_?forward|(^|[/._])(gate|up|down|gate_up)_proj([/._]|$)"
         r"|(^|[/._])(c_)?fc\d*([/._]|$)", "mlp"),
)

# Input axes of flax's attention (linen ``MultiHeadDotProductAttention``,
# ``nnx.MultiHeadAttention``): q/k/v ``(d, heads, head_dim)`` contract d, the output
# projection ``(heads, head_dim, d)`` every axis but the last (for a 2-d ``(in, out)``
# kernel both read ``shape[0]``).
FLAX_ATTENTION_RULES: tuple[Rule, ...] = (
    Rule(r"(^|/)(query|key|value)/kernel$", fan_in=0),
    Rule(r"(^|/)out/kernel$", fan_in=slice(None, -1)),
)

# Gemma (flax) einsum weights: q ``(heads, d, head_dim)``, kv ``(2, kv_heads, d,
# head_dim)``, qkv ``(3, heads, d, head_dim)``, attn_vec ``(heads, head_dim, d)``, gating
# ``(2, d, hidden)``; ``mlp/linear`` ``(hidden, d)`` is (in, out) already.
GEMMA_RULES: tuple[Rule, ...] = (
    Rule(r"(^|/)q_einsum/w$", fan_in=1),
    Rule(r"(^|/)(kv|qkv)_einsum/w$", fan_in=2),
    Rule(r"(^|/)attn_vec_einsum/w$", fan_in=(0, 1)),
    Rule(r"(^|/)gating_einsum(/w)?$", fan_in=1),
)

DEFAULT_RULES: tuple[Rule, ...] = ROLE_RULES + FLAX_ATTENTION_RULES + GEMMA_RULES

# HuggingFace Flax GPT-2 (``FlaxGPT2Model``): its Conv1D stores kernels as (out, in). Not a
# default because other GPT-2 ports use the same names in the (in, out) layout.
HF_FLAX_GPT2_RULES: tuple[Rule, ...] = (
    Rule(r"(^|/)c_(attn|fc|proj)/kernel$", fan_in=-1),
)

# Kernel names used in both layouts: a rule must say which axes are the inputs.
AMBIGUOUS_LAYOUTS: tuple[tuple[str, str], ...] = (
    (r"(^|/)c_(attn|fc|proj)/kernel$",
     "GPT-2 Conv1D name: HF-Flax stores (out, in) (rules=slj.labels.HF_FLAX_GPT2_RULES), "
     "other ports (in, out)"),
    (r"(^|[/.])weight$", "a torch/equinox-style name, usually (out, in), sometimes (in, out)"),
)

# A path that names the input embedding; such leaves outside the blocks get depth 1.
_INPUT_STEM = re.compile(r"(?i)embed|(^|[/._])(wte|wpe|tok_emb|pos_emb)([/._]|$)")
_CONTAINER_SUFFIX = re.compile(r"^(" + "|".join(BLOCK_CONTAINERS) + r")_(\d+)$")
# linen's nn.scan names the lifted module Scan<Class>_<i>; its leaves hold every block.
_SCAN_MODULE = re.compile(r"^Scan[A-Z0-9]\w*_\d+$")
# ``Block_3`` -> ("Block", "3"); ``3`` -> (None, "3").
_INDEXED = re.compile(r"^(?:(.*\D)_)?(\d+)$")
_KERNEL_NAMES = ("kernel", "weight", "w")
_BIAS_NAMES = ("bias", "b")
_AMBIGUOUS = [(re.compile(p), why) for p, why in AMBIGUOUS_LAYOUTS]


class ParamInfo(NamedTuple):
  """What a parameter leaf is, read from its path and shape.

  Attributes:
    path: the leaf's path string, e.g. ``"layers/3/attn/q_proj/kernel"``.
    role: one of :data:`ROLES`.
    depth: n_l, 1-based position in the network (int), or an int vector of length L for a
      stacked leaf (one entry per block along axis 0).
    dim: d_l, the layer's fan-in (the model width for embedding tables), or None when the
      shape and rules cannot settle which axes are the inputs.
    stacked: True when the leaf holds all L blocks along axis 0 (scanned layers).

  ParamInfo is a NamedTuple, hence a pytree node for jax: map over params and labels with
  ``jax.tree.map(f, params, labels, is_leaf=lambda x: isinstance(x, ParamInfo))``.
  """
  path: str
  role: str
  depth: int | np.ndarray
  dim: int | None
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


def _check_fan_in(fan_in, pattern):
  if fan_in is None or isinstance(fan_in, slice):
    return
  axes = fan_in if isinstance(fan_in, tuple) else (fan_in,)
  if not axes or not all(isinstance(a, int) and not isinstance(a, bool) for a in axes):
    raise ValueError(
        f"rules: fan_in of rule {pattern!r} must be an int, a tuple of ints or a slice of "
        f"axes, got {fan_in!r}")


def _to_rule(rule) -> Rule:
  if isinstance(rule, Rule):
    pass
  elif (isinstance(rule, (tuple, list)) and 2 <= len(rule) <= 4
        and isinstance(rule[0], str)):
    rule = Rule(*rule)
  else:
    raise ValueError(
        f"rules: each rule must be a slj.labels.Rule or a (regex, role) pair, got {rule!r}")
  if not isinstance(rule.pattern, str):
    raise ValueError(f"rules: the pattern of {rule!r} must be a regex string")
  if rule.role is not None and rule.role not in ROLES:
    raise ValueError(f"rules: role {rule.role!r} of rule {rule.pattern!r} is not one of {ROLES}")
  _check_fan_in(rule.fan_in, rule.pattern)
  block_ok = (rule.block is None or rule.block == STACKED
              or (isinstance(rule.block, int) and not isinstance(rule.block, bool)
                  and rule.block >= 0))
  if not block_ok:
    raise ValueError(
        f"rules: block of rule {rule.pattern!r} must be an int >= 0 or {STACKED!r}, got "
        f"{rule.block!r}")
  if rule.role is None and rule.fan_in is None and rule.block is None:
    raise ValueError(f"rules: rule {rule.pattern!r} states no role, fan_in or block")
  return rule


def _compile_rules(rules) -> list[tuple[re.Pattern, Rule]]:
  """User rules (tried first) followed by DEFAULT_RULES, validated and compiled."""
  if rules is None:
    user = []
  elif isinstance(rules, Mapping):
    user = list(rules.items())
  elif isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence):
    raise ValueError(
        f"rules must be a sequence of slj.labels.Rule or (regex, role) pairs, or a dict "
        f"regex -> role, got {rules!r}")
  else:
    user = list(rules)
  compiled = []
  for rule in user + list(DEFAULT_RULES):
    rule = _to_rule(rule)
    try:
      compiled.append((re.compile(rule.pattern), rule))
    except re.error as e:
      raise ValueError(f"rules: invalid regex {rule.pattern!r}: {e}") from None
  return compiled


def _leaf_shape(leaf) -> tuple[int, ...]:
  shape = getattr(leaf, "shape", None)
  return tuple(np.shape(leaf) if shape is None else shape)


def _split(path: str) -> list[str]:
  return re.split(r"[/.]", path)


def _block_groups(all_parts: list[list[str]]) -> set[tuple[tuple[str, ...], str]]:
  """(parent prefix, name stem) of every group of >= 2 indexed siblings (``Block_0``,
  ``Block_1``; or ``0``, ``1``) that each hold submodules, not only leaves."""
  members: dict[tuple[tuple[str, ...], str], dict[int, bool]] = {}
  for parts in all_parts:
    for i in range(len(parts) - 1):
      match = _INDEXED.match(parts[i])
      if match:
        found = members.setdefault((tuple(parts[:i]), match.group(1) or ""), {})
        index = int(match.group(2))
        found[index] = found.get(index, False) or len(parts) - i >= 3
  return {key for key, found in members.items() if len(found) >= 2 and all(found.values())}


def _block_position(parts: list[str], groups) -> tuple[str, int | None]:
  """('unrolled', i) for block i, ('stacked', None), or ('outside', None); the outermost
  block marker on the path decides."""
  for i, part in enumerate(parts[:-1]):
    match = _CONTAINER_SUFFIX.match(part)
    if match:
      return "unrolled", int(match.group(2))
    if part in BLOCK_CONTAINERS:
      if parts[i + 1].isdigit():
        return "unrolled", int(parts[i + 1])
      return "stacked", None
    if _SCAN_MODULE.match(part):
      return "stacked", None
    match = _INDEXED.match(part)
    if match and (tuple(parts[:i]), match.group(1) or "") in groups:
      return "unrolled", int(match.group(2))
  return "outside", None


def _axes_product(shape, fan_in, path, pattern) -> int:
  ndim = len(shape)
  if isinstance(fan_in, slice):
    axes = list(range(ndim))[fan_in]
  else:
    axes = list(fan_in) if isinstance(fan_in, tuple) else [fan_in]
    if any(not -ndim <= a < ndim for a in axes):
      axes = []
    axes = [a % ndim for a in axes] if axes else []
  if not axes or len(set(axes)) != len(axes) or len(axes) >= max(ndim, 2):
    raise ValueError(
        f"rules: fan_in={fan_in!r} of rule {pattern!r} does not fit {path}, whose "
        f"(per-block) shape is {shape}: the input axes must be some but not all axes")
  return int(math.prod(shape[a] for a in axes))


class _Entry(NamedTuple):
  path: str
  role: Optional[str]      # None: no rule matched
  kind: str                # 'unrolled', 'stacked' or 'outside'
  index: Optional[int]
  shape: tuple[int, ...]
  dim: Optional[int]       # None: the input axes are unsettled (reason in `why`)
  why: str


def _own_width(path, shape, role, fan_in_rule) -> tuple[Optional[int], str]:
  """(d_l, '') from a per-block shape, or (None, reason) when it cannot be settled."""
  if fan_in_rule is not None:
    return _axes_product(shape, fan_in_rule.fan_in, path, fan_in_rule.pattern), ""
  if len(shape) <= 1:
    return (int(shape[0]) if shape else 1), ""
  if role == "embedding":
    return int(shape[-1]), ""
  for regex, why in _AMBIGUOUS:
    if regex.search(path):
      return None, why
  if len(shape) == 2:
    return int(shape[0]), ""
  return None, f"a {len(shape)}-d kernel: which of its axes are inputs depends on the layer"


def _entries(params, rules) -> tuple[list[_Entry], Any]:
  compiled = _compile_rules(rules)
  leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [path_to_str(keypath) for keypath, _ in leaves_with_paths]
  all_parts = [_split(p) for p in paths]
  groups = _block_groups(all_parts)
  raw = []
  for path, parts, (_, leaf) in zip(paths, all_parts, leaves_with_paths):
    matching = [rule for regex, rule in compiled if regex.search(path)]
    role = next((r.role for r in matching if r.role is not None), None)
    fan_in_rule = next((r for r in matching if r.fan_in is not None), None)
    block = next((r.block for r in matching if r.block is not None), None)
    if block is None:
      kind, index = _block_position(parts, groups)
    elif block == STACKED:
      kind, index = "stacked", None
    else:
      kind, index = "unrolled", block
    raw.append((path, parts, role, kind, index, _leaf_shape(leaf), fan_in_rule))

  widths = {}
  for path, parts, role, kind, _, shape, fan_in_rule in raw:
    per_block = shape[1:] if kind == "stacked" else shape
    if kind == "stacked" and not shape:
      raise ValueError(
          f"label_params: {path} is read as a stacked (scanned) leaf (blocks along axis 0) "
          "but it is a scalar: stacked leaves need the block axis first, and scalars have none.")
    widths[path] = _own_width(path, per_block, role, fan_in_rule)

  placement = {path: (kind, index) for path, _, _, kind, index, _, _ in raw}
  entries = []
  for path, parts, role, kind, index, shape, fan_in_rule in raw:
    dim, why = widths[path]
    name = parts[-1]
    if name in _BIAS_NAMES:
      # A bias belongs to its kernel's layer: same width and depth, whatever rules matched.
      stem = path[:len(path) - len(name)]
      sibling = next((stem + k for k in _KERNEL_NAMES if stem + k in widths), None)
      if sibling is not None:
        dim, why = widths[sibling]
        why = why and f"its kernel {sibling}: {why}"
        kind, index = placement[sibling]
      elif fan_in_rule is None:
        per_block = shape[1:] if kind == "stacked" else shape
        dim, why = int(math.prod(per_block)), ""
    entries.append(_Entry(path, role, kind, index, shape, dim, why))
  return entries, treedef


def _count_blocks(entries) -> int:
  """L: max block index + 1 for unrolled trees, the common shape[0] for stacked ones."""
  unrolled = [e.index for e in entries if e.kind == "unrolled"]
  stacked = {e.path: e.shape for e in entries if e.kind == "stacked"}
  if unrolled and stacked:
    raise ValueError(
        "label_params: params mix unrolled blocks (e.g. layers/0/...) and stacked blocks "
        f"(e.g. {next(iter(stacked))}); depth is ambiguous. Stacked paths: {sorted(stacked)}")
  if stacked:
    lengths = {s[0] for s in stacked.values()}
    if len(lengths) > 1:
      listing = ", ".join(f"{p}: {s}" for p, s in sorted(stacked.items()))
      raise ValueError(
          "label_params: stacked (scanned) leaves disagree on the number of blocks "
          f"(shape[0] in {sorted(lengths)}): {listing}")
    return lengths.pop()
  return max(unrolled) + 1 if unrolled else 0


def _depth(entry: _Entry, num_blocks: int):
  if entry.kind == "stacked":
    return np.arange(2, num_blocks + 2, dtype=np.int32)
  if entry.kind == "unrolled":
    return entry.index + 2
  if entry.role == "embedding" or _INPUT_STEM.search(entry.path):
    return 1
  return num_blocks + 2


def _module_pattern(path: str) -> str:
  """A regex for a suggested rule: the module holding ``path`` (its parent's name), or the
  leaf's own name where the parent is a block index or there is none."""
  parts = path.split("/")
  if len(parts) >= 2 and not parts[-2].isdigit():
    return r"(^|/)" + re.escape(parts[-2]) + "/"
  return r"(^|/)" + re.escape(parts[-1]) + "$"


def _unmatched_error(paths: list[str]) -> ValueError:
  listing = "\n".join(f"  {p}" for p in paths)
  suggestions = list(dict.fromkeys(_module_pattern(p) for p in paths))[:4]
  example = ", ".join(f'(r"{s}", "other")' for s in suggestions)
  return ValueError(
      f"no role rule matched {len(paths)} parameter path(s):\n{listing}\n"
      f"Name each layer's role with rules= (regex on the path, tried before the defaults, "
      f"first match wins; role one of {ROLES}), e.g.\n"
      f"  rules=[{example}]\n"
      f"(replace \"other\" with each layer's role; slj.labels.describe(params, rules=...) "
      f"shows the result).")


def label_params(params, rules=None, strict: bool = True):
  """Labels every leaf of ``params`` with a :class:`ParamInfo` (role, depth, dim).

  Args:
    params: a pytree of arrays (or ``jax.ShapeDtypeStruct``): pure dicts or ``nnx.State``
      from NNX (integer keys), linen trees (``Block_3``, ``layers_3``), HuggingFace-style
      dotted keys (``model.layers.3.mlp...``), or stacked (scanned) trees.
    rules: extra :class:`Rule` s or ``(regex, role)`` pairs (or a dict regex -> role),
      tried before :data:`DEFAULT_RULES`.
    strict: if True, a leaf no rule gives a role raises ``ValueError`` listing every such
      path; if False it is labelled ``"other"``.

  Returns:
    A pytree with the structure of ``params`` whose leaves are ParamInfo (see ParamInfo on
    mapping over it together with ``params``). ``dim`` is None where the layout is
    unsettled (:func:`layer_scales` raises on those).

  Raises:
    ValueError: unmatched paths (strict), bad rules, a tree that mixes stacked and
      unrolled blocks, or stacked leaves that disagree on the number of blocks.
  """
  entries, treedef = _entries(params, rules)
  unmatched = [e.path for e in entries if e.role is None]
  if unmatched and strict:
    raise _unmatched_error(unmatched)
  num_blocks = _count_blocks(entries)
  infos = [ParamInfo(e.path, e.role or "other", _depth(e, num_blocks), e.dim,
                     e.kind == "stacked") for e in entries]
  return jax.tree_util.tree_unflatten(treedef, infos)


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


def check_role_scales(role_scales) -> dict:
  """:data:`DEFAULT_ROLE_SCALES` with ``role_scales`` (a dict role -> scale) merged in;
  unknown roles, and scales that are not finite numbers > 0, raise ValueError."""
  merged = dict(DEFAULT_ROLE_SCALES)
  if role_scales is None:
    return merged
  if not isinstance(role_scales, dict):
    raise ValueError(f"role_scales must be a dict role -> scale, got {type(role_scales).__name__}")
  unknown = sorted(set(role_scales) - set(DEFAULT_ROLE_SCALES))
  if unknown:
    raise ValueError(
        f"role_scales has unknown roles {unknown}; valid roles: {sorted(DEFAULT_ROLE_SCALES)}")
  for role, value in role_scales.items():
    try:
      valid = not isinstance(value, (str, bytes, bool)) and 0 < float(value) < math.inf
    except (TypeError, ValueError):
      valid = False
    if not valid:
      raise ValueError(f"role_scales[{role!r}] must be a finite number > 0, got {value!r}")
  merged.update(role_scales)
  return merged


def _scale_problems(entries, num_blocks) -> Optional[str]:
  """Why Sophia-Lambda's scale cannot be formed for this tree (None when it can)."""
  messages = []
  unsettled = [e for e in entries if e.dim is None]
  if unsettled:
    listing = "\n".join(f"  {e.path} {e.shape}: {e.why}" for e in unsettled)
    example = re.escape(next(e.path for e in unsettled))
    messages.append(
        f"cannot tell the layer width d_l (the fan-in: the axes the layer contracts over) "
        f"of {len(unsettled)} leaf/leaves:\n{listing}\n"
        f"Name the input axes with a rule (axes of the per-block shape), e.g.\n"
        f"  rules=[slj.labels.Rule(r\"{example}$\", fan_in=0)]\n"
        f"(a tuple for several axes, slice(None, -1) for all but the last; HF-Flax GPT-2: "
        f"rules=slj.labels.HF_FLAX_GPT2_RULES).")
  if num_blocks == 0:
    placed = ("embedding", "head", "norm")
    unplaced = [e.path for e in entries
                if e.role not in placed and not _INPUT_STEM.search(e.path)]
    if unplaced:
      listing = "\n".join(f"  {p}" for p in unplaced)
      modules = list(dict.fromkeys(_module_pattern(p) for p in unplaced))[:2]
      example = ", ".join(f'slj.labels.Rule(r"{m}", block={i})' for i, m in enumerate(modules))
      messages.append(
          "found no indexed blocks or layers (layers/3, h/3, layer_3, Block_3, an nnx "
          "list blocks/0, a scanned stack), so the depth n_l of these leaves is unknown:\n"
          f"{listing}\nName the block stack that way, or place leaves in blocks with rules, "
          f"e.g.\n  rules=[{example}]")
  if not messages:
    return None
  return ("Sophia-Lambda's layer scale lambda_l = c sqrt(d_l / n_l) "
          + "\n".join(messages)
          + "\nOr pass layer_scale=None to train without the layer scale.")


def layer_scales(params, c: float | None = None, rules=None,
                 clip: tuple[float, float] | None = (0.1, 10.0), strict: bool = True):
  """Sophia-Lambda layer scales ``lambda_l = clamp(c * sqrt(d_l / n_l), *clip)`` per leaf.

  d_l and n_l are the ``dim`` and ``depth`` of :func:`label_params` (Sophia-Lambda paper,
  eq. 2: "d_l is layer dimension and n_l is position in network"). With ``c=None``, c
  normalises the parameter-count-weighted mean over all leaves (each block of a stacked leaf
  counted separately) to 1::

      c = sum_l size_l / sum_l size_l * sqrt(d_l / n_l)

  and the clamp is applied after that, so the clamped mean may differ slightly from 1.

  Only depth and dim are used; roles matter only through them (embedding width and depth
  1), so leaves no rule gives a role count as "other" here instead of raising.

  Args:
    params: pytree of arrays or ``jax.ShapeDtypeStruct`` (only shapes are read).
    c: the scale constant; None for the normalised default. Must be finite and > 0.
    rules: extra rules, as in :func:`label_params`.
    clip: ``(low, high)`` clamp, or None for no clamp.
    strict: if True (default), raise where d_l or n_l cannot be inferred: a kernel whose
      input axes no rule or shape settles, or a tree with no blocks anywhere whose leaves
      are not all embeddings, norms and heads. If False, such widths fall back to
      ``shape[0]`` and such leaves to depth L + 2, as a guess.

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
  entries, treedef = _entries(params, rules)
  num_blocks = _count_blocks(entries)
  if strict:
    problem = _scale_problems(entries, num_blocks)
    if problem:
      raise ValueError(problem)

  raw, weights = [], []
  for e in entries:
    stacked = e.kind == "stacked"
    per_block = e.shape[1:] if stacked else e.shape
    dim = e.dim if e.dim is not None else (per_block[0] if per_block else 1)
    depth = np.asarray(_depth(e, num_blocks), dtype=np.float64)
    raw.append(np.sqrt(dim / depth))
    weights.append(np.full(depth.shape, float(math.prod(per_block))))
  if c is None:
    total = sum(float(w.sum()) for w in weights)
    if total == 0:
      raise ValueError("layer_scales: params hold no elements; cannot normalise c")
    c = total / sum(float((w * r).sum()) for w, r in zip(weights, raw))

  scales = []
  for e, r in zip(entries, raw):
    value = c * r
    if bounds is not None:
      value = np.clip(value, *bounds)
    if e.kind == "stacked":
      value = value.reshape((-1,) + (1,) * (len(e.shape) - 1))
    scales.append(np.asarray(value, dtype=np.float32))
  return jax.tree_util.tree_unflatten(treedef, scales)


class LabelTable(str):
  """The text of :func:`describe`; shown as the table itself in a REPL or notebook."""

  def __repr__(self) -> str:
    return str(self)


def _path_key(path: str):
  return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in _split(path)]


def _span(values, fmt) -> str:
  values = np.asarray(values).reshape(-1)
  if values.size == 1 or np.all(values == values[0]):
    return fmt(values[0])
  return f"{fmt(values[0])}..{fmt(values[-1])}"


def describe(params, rules=None, role_scales: Optional[dict] = None) -> LabelTable:
  """A table of what the layer-adaptive optimizers read from ``params``, one row per leaf.

  Columns: path, shape, role (``?``: no rule matched), depth n_l, width d_l (``?``:
  unsettled layout), Sophia-Lambda's lambda_l (default c and clamp) and LAVSM/LAMVS's role
  scale. Stacked leaves show their first..last block. Rows are ordered by depth. Below the
  table, what ``lavsm``/``lamvs`` and ``sophia_lambda`` would refuse, with the fix. Never
  raises for an unlabelled tree (bad ``rules`` still raise): it is the place to look
  before training. ``slj info`` prints this table for the model presets.

  Args:
    params: pytree of arrays or ``jax.ShapeDtypeStruct``.
    rules: extra rules, as in :func:`label_params`.
    role_scales: overrides of :data:`DEFAULT_ROLE_SCALES`, as the optimizers'.
  """
  scales_by_role = check_role_scales(role_scales)
  entries, treedef = _entries(params, rules)
  num_blocks = _count_blocks(entries)
  problem = _scale_problems(entries, num_blocks)
  lambdas = (None if problem else
             jax.tree.leaves(layer_scales(params, rules=rules, strict=False)))
  rows = []
  for i, e in enumerate(entries):
    depth = _depth(e, num_blocks)
    rows.append((
        int(np.min(depth)), _path_key(e.path),
        (e.path, "x".join(str(d) for d in e.shape) or "scalar", e.role or "?",
         _span(depth, str), "?" if e.dim is None else str(e.dim),
         "-" if lambdas is None else _span(lambdas[i], lambda v: f"{float(v):.3f}"),
         "?" if e.role is None else f"{scales_by_role[e.role]:g}")))
  rows.sort(key=lambda r: (r[0], r[1]))
  header = ("path", "shape", "role", "depth", "width", "lambda", "role scale")
  table = [header] + [r[2] for r in rows]
  widths = [max(len(r[i]) for r in table) for i in range(len(header))]

  def fmt(row):
    return "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()

  total = sum(math.prod(e.shape) for e in entries)
  lines = [f"{len(entries)} leaves, {total:,} parameters, {num_blocks} blocks", "",
           fmt(header), fmt(tuple("-" * w for w in widths))]
  lines += [fmt(r[2]) for r in rows]
  unmatched = [e.path for e in entries if e.role is None]
  if unmatched:
    lines += ["", "lavsm / lamvs would refuse these params: "
              + str(_unmatched_error(unmatched))]
  if problem:
    lines += ["", "sophia_lambda would refuse these params: " + problem]
  return LabelTable("\n".join(lines))
