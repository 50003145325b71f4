"""Gradient transformations of the Sophia / layer-adaptive optimizer family.

Each function returns an ``optax.GradientTransformation`` (or ``...ExtraArgs``) whose
docstring states its equation and where it comes from; the optimizers in
``sophia_lambda_jax.optimizers`` are chains (``optax.chain``) of these and of optax's own
transforms.

Notation (docs/design.md section 1): g gradient, m first moment, v second moment, h the EMA of
the Hessian diagonal, t the number of updates already applied (0 on the first call).

State dtype: every moment and Hessian EMA is kept in float32 whatever the parameter dtype
(bf16 parameters included); ``with_float32_state`` does the casting for a whole chain and
casts the updates back to the parameter dtype.

Under ``optax.inject_hyperparams`` every numeric hyperparameter may be a traced scalar
(``target_unclipped`` included). ``block_size``, which shapes the state, needs nothing
either: ``init`` reads it as the concrete value inject_hyperparams passes outside
``jax.jit`` (under a jitted ``init`` pass it in ``static_args``) and ``update`` reads the
blocks from the state's shapes. Bools (``adaptive_interval``, ``bias_correction``) and the
string ``rho="auto"`` stay static by themselves. Callables that are not schedules (``mask``,
a callable ``layer_scale``) go in ``static_args``, as for optax's own optimizers, which
takes any callable for a schedule.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple, Optional, Union

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sophia_lambda_jax import labels

Array = jax.Array
HessianFn = Callable[[Any], Any]

# Denominator guard of the relative Hessian change r (docs/design.md section 4.3).
_RELATIVE_CHANGE_EPS = 1e-30
# Adaptation of the refresh interval starts with this refresh (1-based): the first few
# refreshes only warm the EMA up from h = 0, so r is large then by construction.
FIRST_ADAPTIVE_REFRESH = 4


# ----------------------------------------------------------------------------------------
# Validation of hyperparameters (only concrete Python / NumPy numbers are checked: traced
# values under ``inject_hyperparams`` and schedules are the caller's responsibility).
# ----------------------------------------------------------------------------------------


def is_concrete_number(value) -> bool:
  """True for a Python or NumPy real number (bools excluded), i.e. a value we can check."""
  if isinstance(value, bool):
    return False
  if isinstance(value, numbers.Real):
    return True
  return isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iuf"


def concrete_int(value):
  """``value`` as a Python int when it is a jax array holding a concrete integer (as
  ``optax.inject_hyperparams`` hands a structural hyperparameter such as ``block_size`` to
  the factory outside ``jax.jit``); anything else unchanged."""
  if (isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer)
      and value.ndim == 0 and jnp.issubdtype(value.dtype, jnp.integer)):
    return int(value)
  return value


def check_number(
    name: str,
    value,
    *,
    low: Optional[float] = None,
    high: Optional[float] = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> None:
  """Raises ValueError naming ``name`` unless ``value`` lies in the stated range.

  Values that are not concrete numbers (traced arrays, schedules) pass unchecked; strings
  and bools are refused (``"3e-4"`` would otherwise fail only inside ``update``).
  """
  if isinstance(value, (str, bytes, bool)):
    raise ValueError(f"{name} must be a number, got {type(value).__name__} {value!r}")
  if not is_concrete_number(value):
    return
  lo_bracket = "(" if low_open else "["
  hi_bracket = ")" if high_open else "]"
  range_text = (f"{lo_bracket}{'-inf' if low is None else low}, "
                f"{'inf' if high is None else high}{hi_bracket}")
  kind = "an integer" if integer else "a finite number"
  message = f"{name} must be {kind} in {range_text}, got {value!r}"
  value_f = float(value)
  if not math.isfinite(value_f):
    raise ValueError(message)
  if integer and value_f != int(value_f):
    raise ValueError(message)
  if low is not None and (value_f < low or (low_open and value_f == low)):
    raise ValueError(message)
  if high is not None and (value_f > high or (high_open and value_f == high)):
    raise ValueError(message)


def check_beta(name: str, value) -> None:
  """Decay rates must lie in [0, 1)."""
  check_number(name, value, low=0.0, high=1.0, high_open=True)


def check_learning_rate(learning_rate) -> None:
  """A learning rate is a finite number >= 0, or a schedule whose value at step 0 is."""
  if callable(learning_rate):
    try:
      value = learning_rate(0)
    except Exception:  # a stateful or unusual schedule: nothing to check at construction
      return
    if isinstance(value, jax.core.Tracer):
      return
    try:
      value = float(np.asarray(value))
    except (TypeError, ValueError):
      return
    if not math.isfinite(value) or value < 0:
      raise ValueError(
          f"learning_rate must be a finite number in [0, inf) (or a schedule with such "
          f"values), but the schedule gives {value!r} at step 0")
    return
  if learning_rate is None:
    raise ValueError("learning_rate must be a finite number in [0, inf) or a schedule, got None")
  check_number("learning_rate", learning_rate, low=0.0)


def check_intervals(hessian_interval, min_interval, max_interval) -> None:
  """Refresh intervals are integers >= 1 and min_interval <= max_interval."""
  check_number("hessian_interval", hessian_interval, low=1, integer=True)
  check_number("min_interval", min_interval, low=1, integer=True)
  check_number("max_interval", max_interval, low=1, integer=True)
  if (is_concrete_number(min_interval) and is_concrete_number(max_interval)
      and min_interval > max_interval):
    raise ValueError(
        f"min_interval must be <= max_interval, got min_interval={min_interval} > "
        f"max_interval={max_interval}")


# ----------------------------------------------------------------------------------------
# Float32 state for any chain.
# ----------------------------------------------------------------------------------------


def check_shapes_like_params(name: str, tree, params) -> None:
  """Raises ValueError unless ``tree`` has the structure and exact leaf shapes of ``params``
  (a broadcastable but wrong shape would otherwise pass silently)."""
  try:
    chex.assert_trees_all_equal_shapes(tree, params)
  except (AssertionError, ValueError) as e:
    raise ValueError(f"{name} must have the structure and shapes of params: {e}") from None


def _to_float32(tree):
  return jax.tree.map(
      lambda x: x.astype(jnp.float32)
      if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def with_float32_state(
    inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """Runs ``inner`` on float32 gradients with float32 state; updates get the param dtype::

    init:   state = inner.init(float32(params))      (so every zeros_like moment is float32)
    update: u = inner.update(float32(g), state, params, **extra);  u = u.astype(params.dtype)

  ``params`` reach ``inner`` (and a ``hessian_fn``) in their own dtype. For float32
  parameters this transform is the identity. Its state is ``inner``'s state, unchanged.
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return inner.init(_to_float32(params))

  def update_fn(updates, state, params=None, **extra_args):
    reference = updates if params is None else params
    if params is not None:
      check_shapes_like_params("updates (gradients)", updates, params)
    updates, state = inner.update(_to_float32(updates), state, params, **extra_args)
    updates = jax.tree.map(
        lambda u, r: u if u is None else u.astype(r.dtype), updates, reference,
        is_leaf=lambda x: x is None)
    return updates, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ----------------------------------------------------------------------------------------
# Block layout of the Hessian EMA.
# ----------------------------------------------------------------------------------------


def hessian_block_size(shape: tuple[int, ...], block_size: int) -> int:
  """Block length along the last axis of a leaf of this shape (docs/design.md section 4.1).

  For ndim >= 2 and last dimension n >= 2: the largest divisor of n that is <= block_size
  (each tensor gets its own layout, e.g. n = 96, block_size = 64 -> 48). Otherwise 1 (a
  full diagonal).
  """
  if len(shape) < 2 or shape[-1] < 2 or block_size <= 1:
    return 1
  n = shape[-1]
  for block in range(min(block_size, n), 0, -1):
    if n % block == 0:
      return block
  return 1


def block_shape(shape: tuple[int, ...], block: int) -> tuple[int, ...]:
  """Shape of the stored block-reduced h: (..., n / block)."""
  if block == 1:
    return tuple(shape)
  return tuple(shape[:-1]) + (shape[-1] // block,)


def _explicit_spec(x):
  """(per-dimension spec, mesh) when x carries explicit-mode sharding (``jax.set_mesh`` with
  ``AxisType.Explicit``), else None. Auto-mode arrays need no help: XLA propagates."""
  try:
    sharding = jax.typeof(x).sharding
  except Exception:  # pragma: no cover - older jax without typeof shardings
    return None
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or not getattr(mesh, "_any_axis_explicit", False):
    return None
  spec = tuple(sharding.spec)
  return spec + (None,) * (x.ndim - len(spec)), mesh


def _axes_size(mesh, axes) -> int:
  axes = axes if isinstance(axes, tuple) else (axes,)
  return math.prod(mesh.shape[a] for a in axes)


def split_last_axis(x: Array, block: int) -> Array:
  """(..., n) -> (..., n / block, block). Under explicit sharding the last axis's mesh axes
  move to the n / block axis when they divide it, and are gathered otherwise."""
  shape = x.shape[:-1] + (x.shape[-1] // block, block)
  found = _explicit_spec(x)
  if found is None:
    return x.reshape(shape)
  spec, mesh = found
  last = spec[-1]
  if last is not None and shape[-2] % _axes_size(mesh, last):
    last = None
  return jax.lax.reshape(x, shape, out_sharding=jax.sharding.PartitionSpec(
      *spec[:-1], last, None))


def merge_last_axes(x: Array, like: Array) -> Array:
  """(..., n / block, block) -> like.shape, laid out like ``like`` under explicit sharding."""
  found = _explicit_spec(like)
  if found is None:
    return x.reshape(like.shape)
  spec, _ = found
  blocked_spec = _explicit_spec(x)[0]
  merged = jax.lax.reshape(x, like.shape, out_sharding=jax.sharding.PartitionSpec(
      *blocked_spec[:-1]))
  if blocked_spec[-2] != spec[-1]:
    merged = jax.sharding.reshard(merged, jax.sharding.PartitionSpec(*spec))
  return merged


def block_mean(x: Array, block: int) -> Array:
  """Mean over consecutive blocks of the last axis: (..., n) -> (..., n / block)."""
  if block == 1:
    return x
  return jnp.mean(split_last_axis(x, block), axis=-1)


def _zeros_sharded_like(param, shape: tuple[int, ...]) -> Array:
  """float32 zeros of ``shape`` laid out like ``param`` on every dimension the mesh divides.

  Keeps the optimizer state of a sharded parameter sharded the same way, including the
  block-reduced h whose last axis is shorter (a mesh axis that no longer divides it is
  dropped there). Under jit (tracers carry no placement in auto mode) or for unsharded
  params this is plain ``jnp.zeros``; jit's ``out_shardings`` then decides.
  """
  sharding = getattr(param, "sharding", None)
  if not (isinstance(param, jax.Array) and not isinstance(param, jax.core.Tracer)
          and isinstance(sharding, jax.sharding.NamedSharding)):
    return jnp.zeros(shape, jnp.float32)
  if tuple(shape) == tuple(param.shape):
    return jnp.zeros(shape, jnp.float32, device=sharding)
  spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
  spec = tuple(None if axes is not None and dim % _axes_size(sharding.mesh, axes) else axes
               for dim, axes in zip(shape, spec))
  return jnp.zeros(shape, jnp.float32, device=jax.sharding.NamedSharding(
      sharding.mesh, jax.sharding.PartitionSpec(*spec)))


def _global_norm(tree) -> Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


# ----------------------------------------------------------------------------------------
# Block-wise Hessian EMA with its refresh schedule.
# ----------------------------------------------------------------------------------------


_NNX_CLOSURE_HINT = (
    "hessian_fn used a Flax NNX module closed over from outside the optimizer: the "
    "optimizer calls hessian_fn inside jax.lax.cond (a new trace level), where NNX refuses "
    "to read or update that module's variables. Compute the estimate from the params "
    "hessian_fn is given, e.g. hessian_fn=slj.hessian.gauss_newton_bartlett("
    "slj.hessian.nnx_params_fn(model, lambda m: m(x)), key), which splits the model before "
    "the update and merges it back inside.")


class HessianEMAState(NamedTuple):
  """State of ``hessian_ema``.

  count: updates applied so far (t). h: float32 EMA of the Hessian diagonal, block-reduced
  per leaf (shape (..., n / block)), without bias correction. interval: current refresh
  interval. next_refresh: the t of the next refresh. refresh_count: refreshes done (k).
  relative_change: r of the last refresh. correction: the factor the EMA is read with,
  1 / (1 - b2^k) with bias correction and 1 without. skipped: refreshes left out because
  their estimate was not finite (they do not count in k).
  """
  count: Array
  h: Any
  interval: Array
  next_refresh: Array
  refresh_count: Array
  relative_change: Array
  correction: Array
  skipped: Array


def _refresh_due(state: HessianEMAState) -> Array:
  return state.count >= state.next_refresh


def _estimate_of(hessian_fn: HessianFn, params) -> Any:
  """hessian_fn(params), checked to be a pytree shaped like params."""
  try:
    estimate = hessian_fn(params)
  except Exception as error:
    if "different trace level" in str(error):  # Flax NNX's TraceContextError & co.
      raise ValueError(_NNX_CLOSURE_HINT) from error
    raise
  if jax.tree.structure(estimate) != jax.tree.structure(params):
    raise ValueError(
        "hessian_fn(params) must return a pytree with the structure of params; got "
        f"{jax.tree.structure(estimate)} for params {jax.tree.structure(params)}")
  check_shapes_like_params("hessian_fn(params)", estimate, params)
  return estimate


def _block_ema(h, estimate, blocks, b2):
  """h = b2 h + (1 - b2) block_mean(estimate), per leaf, in float32."""
  return jax.tree.map(
      lambda h, e, b: (b2 * h + (1.0 - b2) * block_mean(e.astype(jnp.float32), b)).astype(
          jnp.float32),
      h, estimate, blocks)


def _all_finite(tree) -> Array:
  """True when every entry of every leaf is finite (one bool scalar)."""
  finite = jnp.ones([], bool)
  for x in jax.tree.leaves(tree):
    finite = finite & jnp.all(jnp.isfinite(x))
  return finite


def _debias_factor(b2, refresh_count: Array, bias_correction: bool) -> Array:
  """The factor h is read with after ``refresh_count`` refreshes: 1 / (1 - b2^k) with bias
  correction, else 1."""
  if not bias_correction:
    return jnp.ones([], jnp.float32)
  # k = 0 only before the first refresh, when h is 0 whatever it is multiplied by.
  debias = 1.0 - jnp.asarray(b2, jnp.float32) ** refresh_count.astype(jnp.float32)
  return jnp.where(refresh_count > 0, 1.0 / jnp.maximum(debias, 1e-30), 1.0)


def _relative_change(h_after, h_before, correction_after, correction_before) -> Array:
  """r = ||h_hat_after - h_hat_before|| / (||h_hat_before|| + 1e-30) over all blocks."""
  change = _global_norm(jax.tree.map(
      lambda a, b: correction_after * a - correction_before * b, h_after, h_before))
  return change / (correction_before * _global_norm(h_before) + _RELATIVE_CHANGE_EPS)


def _adapted_interval(interval: Array, r: Array, refreshed: Array, refresh_count: Array,
                      min_interval, max_interval, r_low, r_high) -> Array:
  """The adaptive refresh schedule (docs/design.md section 4.3): from the
  ``FIRST_ADAPTIVE_REFRESH``-th refresh on, double the interval (up to max_interval) when
  r < r_low and halve it (down to min_interval) when r > r_high."""
  adapt = refreshed & (refresh_count >= FIRST_ADAPTIVE_REFRESH)
  longer = jnp.minimum(2 * interval, max_interval)
  shorter = jnp.maximum(interval // 2, min_interval)
  return jnp.where(adapt & (r < r_low), longer,
                   jnp.where(adapt & (r > r_high), shorter, interval))


def hessian_ema(
    b2: float = 0.99,
    block_size: int = 1,
    hessian_interval: int = 10,
    adaptive_interval: bool = False,
    min_interval: int = 2,
    max_interval: int = 100,
    r_low: float = 0.002,
    r_high: float = 0.02,
    bias_correction: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Block-wise EMA of the Hessian diagonal, refreshed on a fixed or adaptive schedule.

  On a refresh step (t >= next_refresh; the first is t = 0), before the update is formed:

      h = b2 * h + (1 - b2) * block_mean(hessian_fn(params));  k = k + 1

  and the EMA is read as h_hat = h / (1 - b2^k) with ``bias_correction`` (k = refreshes so
  far, as Adam corrects its moments per update; Kingma & Ba 2015, sec. 3), else as h. h
  starts at 0, so without the correction it holds (1 - b2^k) of its steady value after k
  refreshes (10 % after 10 refreshes with b2 = 0.99). The official SophiaG code has no
  correction; it is an option here (see docs/design.md for the default).

  ``hessian_fn`` runs inside ``jax.lax.cond``, so it costs nothing on other steps. The block
  mean follows ``hessian_block_size`` (``block_size=1``: full diagonal, i.e. Sophia; Liu et
  al. 2023, "Sophia: A Scalable Stochastic Second-order Optimizer", Alg. 3). Then::

    fixed:    next_refresh = t + hessian_interval
    adaptive: from the 4th refresh on, with r = ||h_after - h_before|| / (||h_before|| + 1e-30)
              over all blocks of all leaves (of h_hat with bias correction):
              r < r_low -> interval = min(2 interval, max_interval);
              r > r_high -> interval = max(interval // 2, min_interval);
              next_refresh = t + interval.   (docs/design.md section 4.3.)

  Non-finite estimates: a refresh whose new h would hold an inf or NaN (an estimate with a
  non-finite entry, or one that overflows the EMA) is skipped as a whole: h, k and the
  interval stay as they were, ``skipped`` counts it, and the next refresh comes one
  interval later as usual, so one bad estimate costs one refresh and h stays finite. (A
  per-entry repair would leave k, and so the bias correction, inconsistent between
  entries.) Non-finite *gradients* are not this transform's business: they enter m and make
  the update non-finite, and the training loop stops on them (docs/design.md section 7).

  This is a building block of ``scale_by_clipped_curvature``: its ``update`` returns the
  current block-reduced h (h_hat with bias correction) in place of the updates. ``update``
  needs ``params`` and ``hessian_fn`` (a function params -> pytree like params) and raises
  ValueError without. Under ``inject_hyperparams`` ``block_size`` is read in ``init`` (see
  the module docstring).
  """
  check_beta("b2", b2)
  block_size = concrete_int(block_size)
  check_number("block_size", block_size, low=1, integer=True)
  check_intervals(hessian_interval, min_interval, max_interval)
  check_number("r_low", r_low, low=0.0)
  check_number("r_high", r_high, low=0.0)
  if is_concrete_number(r_low) and is_concrete_number(r_high) and r_low > r_high:
    raise ValueError(f"r_low must be <= r_high, got r_low={r_low} > r_high={r_high}")

  def init_fn(params):
    if not is_concrete_number(block_size):
      raise ValueError(
          "block_size is traced in init: it sets the state's shapes, so under jax.jit of "
          "init pass it in static_args of optax.inject_hyperparams (outside jit it needs "
          "nothing)")
    h = jax.tree.map(
        lambda p: _zeros_sharded_like(
            p, block_shape(tuple(p.shape), hessian_block_size(tuple(p.shape), block_size))),
        params)
    return HessianEMAState(
        count=jnp.zeros([], jnp.int32),
        h=h,
        interval=jnp.asarray(hessian_interval, jnp.int32),
        next_refresh=jnp.zeros([], jnp.int32),
        refresh_count=jnp.zeros([], jnp.int32),
        relative_change=jnp.zeros([], jnp.float32),
        correction=jnp.ones([], jnp.float32),
        skipped=jnp.zeros([], jnp.int32),
    )

  def update_fn(updates, state, params=None, hessian_fn: Optional[HessianFn] = None,
                **extra_args):
    del updates, extra_args
    if params is None:
      raise ValueError(
          "params must be passed to update() of a second-order optimizer: "
          "tx.update(grads, state, params, hessian_fn=fn)")
    if hessian_fn is None or not callable(hessian_fn):
      raise ValueError(
          "hessian_fn must be passed to update() of a second-order optimizer as a function "
          "params -> pytree like params: tx.update(grads, state, params, hessian_fn=fn)")
    due = _refresh_due(state)

    def refresh(h_before):
      # The blocks are read from the state's shapes: block_size may be traced here.
      blocks = jax.tree.map(lambda p, h: p.shape[-1] // h.shape[-1] if p.ndim else 1,
                            params, h_before)
      h_after = _block_ema(h_before, _estimate_of(hessian_fn, params), blocks, b2)
      finite = _all_finite(h_after)
      h_after = jax.tree.map(lambda a, b: jnp.where(finite, a, b), h_after, h_before)
      if not adaptive_interval:
        return h_after, jnp.zeros([], jnp.float32), finite
      r = _relative_change(h_after, h_before,
                           _debias_factor(b2, state.refresh_count + 1, bias_correction),
                           state.correction)
      return h_after, jnp.where(finite, r.astype(jnp.float32), state.relative_change), finite

    def keep(h_before):
      return h_before, state.relative_change, jnp.ones([], bool)

    h, r, finite = jax.lax.cond(due, refresh, keep, state.h)
    do_refresh = due & finite
    refresh_count = state.refresh_count + do_refresh.astype(jnp.int32)
    if adaptive_interval:
      interval = _adapted_interval(state.interval, r, do_refresh, refresh_count,
                                   min_interval, max_interval, r_low, r_high)
    else:
      interval = jnp.broadcast_to(jnp.asarray(hessian_interval), ())
    interval = interval.astype(jnp.int32)
    next_refresh = jnp.where(due, state.count + interval, state.next_refresh).astype(jnp.int32)
    correction = _debias_factor(b2, refresh_count, bias_correction)
    new_state = HessianEMAState(
        count=optax.safe_increment(state.count),
        h=h,
        interval=interval,
        next_refresh=next_refresh,
        refresh_count=refresh_count,
        relative_change=r,
        correction=correction,
        skipped=state.skipped + (due & ~finite).astype(jnp.int32),
    )
    return (jax.tree.map(lambda x: correction * x, h) if bias_correction else h), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ----------------------------------------------------------------------------------------
# Curvature-clipped update.
# ----------------------------------------------------------------------------------------


class ClippedCurvatureState(NamedTuple):
  """State of ``scale_by_clipped_curvature``: momentum m (float32), the Hessian EMA state,
  the denominator constants rho * B and eps of the last update (so ``clip_fraction`` can
  recompute, from the state alone, which coordinates the last update clipped), rho: the rho
  of the last update, and log_rho: the log of the rho the next update uses (with
  ``rho="auto"`` the controller's state; with a fixed rho, log of that rho)."""
  mu: Any
  hessian: HessianEMAState
  scale: Array
  eps: Array
  rho: Array
  log_rho: Array


def _curvature_ratio(m: Array, h_blk: Array, scale, eps) -> Array:
  """m / (scale * max(expand(h_blk), 0) + eps), expanding the block-reduced h by a
  broadcast along a reshaped last axis (never materialised at full size)."""
  m = m.astype(jnp.float32)
  block = m.shape[-1] // h_blk.shape[-1] if m.ndim else 1
  if block == 1:
    return m / (scale * jnp.maximum(h_blk, 0.0) + eps)
  denominator = scale * jnp.maximum(h_blk, 0.0)[..., None] + eps
  return merge_last_axes(split_last_axis(m, block) / denominator, m)


# The rho controller (rho="auto"; docs/design.md section 3.5). Its constants:
AUTO_RHO = "auto"
# rho of the first update. Any value inside the bounds works (each step moves rho by at
# most a factor 2); this one is the papers' GNB rho.
RHO_AUTO_INITIAL = 0.04
# rho stays in [RHO_AUTO_MIN, RHO_AUTO_MAX] whatever the tree (an all-zero gradient drives
# it down, h = 0 up): wide enough for GNB (rho B h) and Hutchinson (rho h) scales.
RHO_AUTO_MIN = 1e-6
RHO_AUTO_MAX = 1e4
# Newton damping gamma, the floor of the slope d f / d log rho, and the largest step of
# log rho per update (ln 2: rho at most doubles or halves).
RHO_AUTO_GAIN = 0.5
RHO_AUTO_MIN_SLOPE = 0.05
RHO_AUTO_MAX_STEP = math.log(2.0)
# The unclipped fraction the controller holds when target_unclipped is not given
# (docs/decisions.md).
DEFAULT_TARGET_UNCLIPPED = 0.3


def check_rho(rho, target_unclipped) -> None:
  """rho is a number in (0, inf) or "auto"; target_unclipped goes with "auto" only and lies
  in (0, 1). Raises ValueError naming the argument."""
  if isinstance(rho, str):
    if rho != AUTO_RHO:
      raise ValueError(f"rho must be a number in (0, inf) or {AUTO_RHO!r}, got {rho!r}")
    if target_unclipped is not None:
      check_number("target_unclipped", target_unclipped, low=0.0, high=1.0, low_open=True,
                   high_open=True)
    return
  if target_unclipped is not None:
    raise ValueError(
        f"target_unclipped is the rho controller's target and needs rho={AUTO_RHO!r}; got "
        f"target_unclipped={target_unclipped!r} with rho={rho!r}")
  check_number("rho", rho, low=0.0, low_open=True)


def _sum3(x, y):
  return tuple(a + b for a, b in zip(x, y))


def _unclipped_fractions(ratios) -> tuple[Array, Array, Array]:
  """(f_1/2, f_1, f_2): the fraction of all coordinates with |ratio| < c for c = 1/2, 1, 2.
  Counted per leaf in int32 (exact, whatever the sharding) by one variadic reduction, which
  XLA fuses with the clip (three separate sums made the update 6x slower on a CPU;
  docs/decisions.md), then summed over leaves in float32."""
  counts = [jnp.zeros([], jnp.float32) for _ in range(3)]
  total = 0
  for r in jax.tree.leaves(ratios):
    magnitude = jnp.abs(r)
    below = tuple((magnitude < c).astype(jnp.int32) for c in (0.5, 1.0, 2.0))
    sums = jax.lax.reduce(below, (np.int32(0),) * 3, _sum3, tuple(range(r.ndim)))
    counts = [c + s.astype(jnp.float32) for c, s in zip(counts, sums)]
    total += int(np.prod(r.shape))
  return tuple(c / max(total, 1) for c in counts)


def rho_controller_step(log_rho: Array, fractions, target) -> Array:
  """One step of the rho controller (docs/design.md section 3.5), a damped Newton step on
  log rho towards f_1 = target with the chord slope of f over [rho / 2, 2 rho]::

      s = (f_2 - f_1/2) / ln 4
      log rho <- clip(log rho + clip(gamma (target - f_1) / max(s, s_min), -ln 2, ln 2),
                      ln rho_min, ln rho_max)

  f_c is the fraction of coordinates with ``|m / (rho B h + eps)| < c``: the unclipped fraction
  at rho for c = 1, and (up to eps) the one rho / 2 and 2 rho would give for c = 1/2, 2.
  """
  f_half, f_one, f_two = fractions
  slope = (f_two - f_half) / math.log(4.0)
  step = RHO_AUTO_GAIN * (target - f_one) / jnp.maximum(slope, RHO_AUTO_MIN_SLOPE)
  step = jnp.clip(step, -RHO_AUTO_MAX_STEP, RHO_AUTO_MAX_STEP)
  return jnp.clip(log_rho + step, math.log(RHO_AUTO_MIN), math.log(RHO_AUTO_MAX)).astype(
      jnp.float32)


def scale_by_clipped_curvature(
    b1: float = 0.965,
    rho: Union[float, str] = 0.04,
    eps: float = 1e-15,
    batch_tokens: float = 1,
    hessian: Optional[optax.GradientTransformationExtraArgs] = None,
    target_unclipped: Optional[float] = None,
) -> optax.GradientTransformationExtraArgs:
  """Sophia's momentum, pre-conditioned by the Hessian EMA and clipped element-wise:

      m = b1 m + (1 - b1) g                                   (no bias correction)
      u = clip(m / (rho * B * max(expand(h), 0) + eps), 1)    (to [-1, 1])

  with B = ``batch_tokens`` (the number of tokens the Hessian estimate was computed from:
  GNB returns g_hat^2 of a token-mean gradient, so B g_hat^2 is the per-token Gauss-Newton
  diagonal) and h from the ``hessian`` sub-transform (``hessian_ema``, refreshed before the
  division). With B = tokens per step and eps = 1e-15 this is the
  published SophiaG rule ``ratio = (|m| / (rho*bs*h + 1e-15)).clamp(max=1)`` times sign(m)
  (Liu et al. 2023, Alg. 3; github.com/Liuhong99/Sophia). The block-reduced h is broadcast
  along the last axis, never materialised at full size.

  ``rho="auto"`` (this project's extension, docs/design.md section 3.5): rho_t is the
  controller's, starting at ``RHO_AUTO_INITIAL``. From the ratio the clip forms, the same
  update counts the fractions f_c of coordinates with ``|ratio| < c`` (c = 1/2, 1, 2) and, after
  the update is formed with rho_t, moves log rho by a damped Newton step towards
  f_1 = ``target_unclipped`` (default ``DEFAULT_TARGET_UNCLIPPED``) with the slope
  (f_2 - f_1/2) / ln 4 (``rho_controller_step``): at most a factor 2 per update, inside
  [``RHO_AUTO_MIN``, ``RHO_AUTO_MAX``]. Liu et al. 2023 hand-tune rho for 10-50 %
  unclipped; the controller holds the fraction without a recalibration when B, the model or
  the run length change.
  ``target_unclipped`` may be traced under ``inject_hyperparams``; "auto" is static.

  ``update`` takes ``params`` and ``hessian_fn`` (passed on to ``hessian``). The fraction
  of clipped coordinates per group is not counted here; use ``clip_fraction(state)``,
  which recomputes it from m, h, rho * B and eps in the state, and ``current_rho(state)``.
  """
  check_beta("b1", b1)
  check_rho(rho, target_unclipped)
  check_number("eps", eps, low=0.0)
  if batch_tokens is None:
    raise ValueError(
        "batch_tokens must be given: the number of tokens the Hessian estimate was "
        "computed from, over all devices (under optax.MultiSteps: one micro-batch's); a "
        "finite number in (0, inf)")
  check_number("batch_tokens", batch_tokens, low=0.0, low_open=True)
  hessian = hessian_ema() if hessian is None else hessian
  auto = isinstance(rho, str)
  target = DEFAULT_TARGET_UNCLIPPED if target_unclipped is None else target_unclipped

  def init_fn(params):
    first_rho = jnp.asarray(RHO_AUTO_INITIAL if auto else rho, jnp.float32)
    return ClippedCurvatureState(
        mu=jax.tree.map(lambda p: _zeros_sharded_like(p, tuple(p.shape)), params),
        hessian=hessian.init(params),
        scale=jnp.zeros([], jnp.float32),
        eps=jnp.zeros([], jnp.float32),
        rho=first_rho,
        log_rho=jnp.log(first_rho))

  def update_fn(updates, state, params=None, **extra_args):
    h, hessian_state = hessian.update(updates, state.hessian, params, **extra_args)
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    mu = jax.tree.map(lambda m: m.astype(jnp.float32), mu)
    eps_ = jnp.asarray(eps, jnp.float32)
    if auto:
      rho_t = jnp.exp(state.log_rho)
      scale = rho_t * jnp.asarray(batch_tokens, jnp.float32)
      ratios = jax.tree.map(lambda m, hb: _curvature_ratio(m, hb, scale, eps_), mu, h)
      new_updates = jax.tree.map(lambda r: jnp.clip(r, -1.0, 1.0), ratios)
      log_rho = rho_controller_step(state.log_rho, _unclipped_fractions(ratios),
                                    jnp.asarray(target, jnp.float32))
    else:
      rho_t = jnp.asarray(rho, jnp.float32)
      scale = jnp.asarray(rho * batch_tokens, jnp.float32)
      new_updates = jax.tree.map(
          lambda m, hb: jnp.clip(_curvature_ratio(m, hb, scale, eps_), -1.0, 1.0), mu, h)
      log_rho = jnp.log(rho_t)
    return new_updates, ClippedCurvatureState(mu=mu, hessian=hessian_state, scale=scale,
                                              eps=eps_, rho=rho_t, log_rho=log_rho)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ----------------------------------------------------------------------------------------
# Scales by parameter path.
# ----------------------------------------------------------------------------------------


def scale_by_layer_scale(
    layer_scale: Union[bool, None, Callable[[Any], Any], Any] = True,
    rules=None,
) -> optax.GradientTransformationExtraArgs:
  """Multiplies each leaf's update by its layer scale lambda_l (Sophia-Lambda, eq. 2):

      u = lambda_l * u,   lambda_l = c * sqrt(d_l / n_l), clamped to [0.1, 10]

  ``layer_scale=True``: ``sophia_lambda_jax.labels.layer_scales(params, rules=rules)`` (c
  normalises the parameter-count-weighted mean of lambda to 1); a tree whose widths or
  depths it cannot infer raises ValueError at ``init``, naming the paths. ``None``/``False``:
  identity. A callable ``params -> pytree of floats`` (pass it in static_args of
  ``inject_hyperparams``) or a pytree of floats replaces the default. Scales come from paths
  and shapes only, so they are constants of the compiled step. Stateless.
  """
  if layer_scale is not None and not isinstance(layer_scale, bool) and not callable(
      layer_scale):
    for leaf in jax.tree.leaves(layer_scale):
      if is_concrete_number(leaf) and not (math.isfinite(float(leaf)) and float(leaf) > 0):
        raise ValueError(f"layer_scale values must be finite numbers in (0, inf), got {leaf!r}")

  def scales_for(tree):
    if layer_scale is True:
      return labels.layer_scales(tree, rules=rules)
    if callable(layer_scale):
      return layer_scale(tree)
    return layer_scale

  def init_fn(params):
    if layer_scale is True:
      scales_for(params)  # a tree the labels cannot read fails here, before training
    return optax.EmptyState()

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if layer_scale is None or layer_scale is False:
      return updates, state
    scales = scales_for(updates if params is None else params)
    updates = jax.tree.map(lambda u, s: u * jnp.asarray(s, jnp.float32).astype(u.dtype),
                           updates, scales)
    return updates, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scale_by_role(role_scales: Optional[dict] = None,
                  rules=None) -> optax.GradientTransformation:
  """Multiplies each leaf's update by a fixed scale of its role (LAVSM eq. 1):

      u = s_role * u,  s = attention 1.8, mlp 1.2, embedding 1.0, norm 0.7, head 1.0, other 1.0

  Roles come from ``sophia_lambda_jax.labels.label_params(params, rules)``: a path no rule
  gives a role raises ValueError at ``init``, listing every such path (counting it as
  "other" would silently scale, e.g., an MLP by 1.0 instead of 1.2); a catch-all rule
  ``(r".*", "other")`` at the end of ``rules`` restores that. ``role_scales`` overrides
  some of ``labels.DEFAULT_ROLE_SCALES``. Stateless.
  """
  scales = labels.check_role_scales(role_scales)

  def roles_of(tree):
    infos = labels.label_params(tree, rules=rules)
    return [info.role for info in jax.tree.leaves(
        infos, is_leaf=lambda x: isinstance(x, labels.ParamInfo))]

  def init_fn(params):
    roles_of(params)  # unknown names fail here, before training
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    leaves, treedef = jax.tree.flatten(updates)
    scaled = [u * jnp.asarray(scales[role], u.dtype)
              for u, role in zip(leaves, roles_of(updates))]
    return jax.tree.unflatten(treedef, scaled), state

  return optax.GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------------------------------
# Adam-family moments.
# ----------------------------------------------------------------------------------------


class VarianceClippedMomentsState(NamedTuple):
  """State of ``scale_by_variance_clipped_moments``: step count, m and v (float32)."""
  count: Array
  mu: Any
  nu: Any


def scale_by_variance_clipped_moments(
    b1: float = 0.9,
    b2: float = 0.95,
    variance_clip: float = 0.5,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
  """LAVSM's variance-stabilised momentum (LAVSM paper, eqs. 2-5), without bias correction:

      m = b1 m + (1 - b1) g ;  v = b2 v + (1 - b2) g^2
      u = m / (min(sqrt(v), variance_clip) + eps)
  """
  check_beta("b1", b1)
  check_beta("b2", b2)
  check_number("variance_clip", variance_clip, low=0.0, low_open=True)
  check_number("eps", eps, low=0.0)

  def init_fn(params):
    zeros = lambda p: _zeros_sharded_like(p, tuple(p.shape))
    return VarianceClippedMomentsState(count=jnp.zeros([], jnp.int32),
                                       mu=jax.tree.map(zeros, params),
                                       nu=jax.tree.map(zeros, params))

  def update_fn(updates, state, params=None):
    del params
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    new_updates = jax.tree.map(
        lambda m, v: m / (jnp.minimum(jnp.sqrt(v), variance_clip) + eps), mu, nu)
    return new_updates, VarianceClippedMomentsState(
        count=optax.safe_increment(state.count), mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


def scale_by_stable_adam(
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
  """Adam with StableAdamW's per-tensor update clipping (Wortsman et al. 2023, "Stable and
  low-precision training for large-scale vision-language models", Alg. 2):

      u_adam = m_hat / (sqrt(v_hat) + eps)            (``optax.scale_by_adam``)
      u = u_adam / max(1, sqrt(mean(g^2 / max(v_hat, eps^2))))   (mean over the tensor)

  v_hat is the bias-corrected second moment including the current g. State: optax's
  ``ScaleByAdamState``.
  """
  check_beta("b1", b1)
  check_beta("b2", b2)
  check_number("eps", eps, low=0.0)
  adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)

  def update_fn(updates, state, params=None):
    grads = updates
    adam_updates, state = adam.update(grads, state, params)
    nu_hat = optax.tree.bias_correction(state.nu, b2, state.count)

    def clip(u, g, v):
      rms = jnp.sqrt(jnp.mean(jnp.square(g) / jnp.maximum(v, eps * eps)))
      return u / jnp.maximum(1.0, rms)

    return jax.tree.map(clip, adam_updates, grads, nu_hat), state

  return optax.GradientTransformation(adam.init, update_fn)


# ----------------------------------------------------------------------------------------
# Decoupled weight decay.
# ----------------------------------------------------------------------------------------


def default_weight_decay_mask(params):
  """True for leaves that decay by default: matrices (ndim >= 2 per layer) that are not norms.

  A stacked (scanned) leaf holds one slice per layer along axis 0, so its per-layer ndim is
  one less: stacked biases (L, n) are vectors and do not decay, as in the unrolled tree.
  Norm scales are excluded by their label role.
  """
  infos = labels.label_params(params, strict=False)
  leaves, treedef = jax.tree.flatten(params)
  info_leaves = jax.tree.leaves(infos, is_leaf=lambda x: isinstance(x, labels.ParamInfo))
  return jax.tree.unflatten(
      treedef, [len(p.shape) - int(info.stacked) >= 2 and info.role != "norm"
                for p, info in zip(leaves, info_leaves)])


def add_decoupled_weight_decay(
    weight_decay: float = 0.1,
    mask: Optional[Union[Any, Callable[[Any], Any]]] = None,
) -> optax.GradientTransformation:
  """Decoupled weight decay (Loshchilov & Hutter 2019): u = u + wd * theta on masked leaves;
  followed by ``scale_by_learning_rate`` this is the ``- lr * wd * theta`` of docs/design.md
  section 2.1.

  ``mask=None`` uses ``default_weight_decay_mask`` (ndim >= 2 and not a norm); a pytree of
  bools or a callable params -> such a pytree overrides it. Reuses
  ``optax.add_decayed_weights``.
  """
  check_number("weight_decay", weight_decay, low=0.0)
  return optax.add_decayed_weights(
      weight_decay, mask=default_weight_decay_mask if mask is None else mask)


# ----------------------------------------------------------------------------------------
# Reading the state for logging.
# ----------------------------------------------------------------------------------------


def _find(state, kind):
  return [x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, kind))
          if isinstance(x, kind)]


def hessian_interval_and_count(state):
  """(current refresh interval, refreshes done) of the first Hessian EMA in an optimizer
  state (works through chains, inject_hyperparams, MultiSteps, apply_if_finite), or None
  when the state has none."""
  found = _find(state, HessianEMAState)
  if not found:
    return None
  return found[0].interval, found[0].refresh_count


def hessian_refresh_due(state):
  """Whether the next ``update`` of an optimizer state refreshes the Hessian EMA (the
  t >= next_refresh test of ``hessian_ema``, for its first Hessian EMA), as a bool scalar
  array usable under jit; None when the state has none.

  A training step can branch on it ahead of ``update`` (e.g. build the curvature estimate
  together with the gradient); ``update`` still decides for itself, so a step that guesses
  wrong stays correct, only slower.
  """
  found = _find(state, HessianEMAState)
  if not found:
    return None
  return _refresh_due(found[0])


def hessian_relative_change(state):
  """r = ||h_after - h_before|| / (||h_before|| + 1e-30) of the last refresh of the first
  Hessian EMA in an optimizer state (0 before the first adaptive refresh, and always 0 with
  a fixed interval, which does not compute it), or None when the state has none."""
  found = _find(state, HessianEMAState)
  if not found:
    return None
  return found[0].relative_change


def hessian_skipped(state):
  """How many refreshes of the first Hessian EMA in an optimizer state were skipped because
  their estimate was not finite (``hessian_ema``), or None when the state has none."""
  found = _find(state, HessianEMAState)
  if not found:
    return None
  return found[0].skipped


def current_rho(state):
  """The rho the last update of the first clipped-curvature state divided by (the
  controller's with ``rho="auto"``, before the first update its initial rho), or None for
  optimizers without one. Works through chains and optax's wrappers like the readers
  above."""
  found = _find(state, ClippedCurvatureState)
  if not found:
    return None
  return found[0].rho


def clip_fraction(state, groups=None):
  """Fraction of coordinates whose ratio ``|m| / (rho B max(h_hat, 0) + eps)`` reached the clip
  (>= 1) on the last update, or None for optimizers without a clipped-curvature state.
  1 - clip_fraction is the fraction the Hessian acts on (the "win rate" of the official
  SophiaG code); Liu et al. 2023 choose rho so that it is 10-50 %.

  ``groups``: optional pytree like params of hashable labels (e.g. each leaf's role); the
  result is then a dict label -> fraction over that label's coordinates, and None -> the
  fraction over all of them (one pass over m for both).

  Recomputed from the state (which holds exactly the m and h of the last update): one read
  of m, so call it on logging steps (inside or outside jit), not necessarily every step.
  """
  found = _find(state, ClippedCurvatureState)
  if not found:
    return None
  curvature = found[0]
  scale = curvature.scale * curvature.hessian.correction
  mu_leaves, treedef = jax.tree.flatten(curvature.mu)
  labels = [None] * len(mu_leaves) if groups is None else treedef.flatten_up_to(groups)
  hits: dict[Any, Array] = {}
  totals: dict[Any, int] = {}
  for label, m, h in zip(labels, mu_leaves, jax.tree.leaves(curvature.hessian.h)):
    ratio = _curvature_ratio(m, h, scale, curvature.eps)
    hits[label] = hits.get(label, 0) + jnp.sum(jnp.abs(ratio) >= 1.0, dtype=jnp.int32)
    totals[label] = totals.get(label, 0) + int(np.prod(m.shape))
  fractions = {label: jnp.asarray(hits[label], jnp.float32) / max(totals[label], 1)
               for label in hits}
  if groups is None:
    return fractions.get(None, jnp.zeros([], jnp.float32))
  total_hits = sum(hits.values(), jnp.zeros([], jnp.int32))
  fractions[None] = total_hits.astype(jnp.float32) / max(sum(totals.values()), 1)
  return fractions
