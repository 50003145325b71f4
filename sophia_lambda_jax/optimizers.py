"""The optimizers of the two papers as thin ``optax.chain``s, and their registry.

    import sophia_lambda_jax as slj
    tx = slj.sophia_lambda(learning_rate=schedule, batch_tokens=tokens_per_step)
    state = tx.init(params)
    updates, state = tx.update(grads, state, params, hessian_fn=hessian_fn)
    params = optax.apply_updates(params, updates)

Every optimizer keeps its moments and Hessian EMA in float32 whatever the parameter dtype
(``transforms.with_float32_state``) and returns updates in the parameter dtype. The
parameters themselves are the caller's: bf16 parameters updated in place lose every update
smaller than their rounding step (about 2^-8 of the value, so lr 3e-4 steps vanish), so
keep a float32 master copy and cast it to bf16 for the forward pass.

The registry ``OPTIMIZERS`` (name -> ``OptimizerSpec``) is the one place that knows each
optimizer: its factory, aliases, display name, source, default learning rate and Hessian
estimator; ``register`` adds one. Second-order optimizers
(``OPTIMIZERS[name].second_order``) need ``params`` and ``hessian_fn`` (params ->
pytree like params, a fresh Hessian-diagonal estimate, e.g. ``slj.hessian.
gauss_newton_bartlett``) in ``update``; ``hessian_fn`` runs only on refresh steps.

Every optimizer works under ``optax.inject_hyperparams`` as written, e.g.
``optax.inject_hyperparams(slj.sophia_lambda)(learning_rate=3e-3, batch_tokens=B)``: every
numeric hyperparameter is injectable, and ``block_size``, which shapes the state, is read
once in ``init`` (under a jitted ``init`` pass ``static_args=("block_size",)``). A callable
that is not a schedule (``mask``, a callable ``layer_scale``) goes in ``static_args``, as
for optax's own optimizers. A run-time change of ``hessian_interval`` takes effect for a
fixed interval; with ``adaptive_interval=True`` the interval lives in the state.

Logging: ``hessian_interval_and_count(state)`` -> (current refresh interval, refreshes done),
``clip_fraction(state)`` -> fraction of coordinates whose curvature ratio reached the
clip on the last update (recomputed from m and h in the state: one read of m, so the update
itself carries no extra pass), ``current_rho(state)`` -> the rho of the last update (fixed,
or the controller's with ``rho="auto"``) and ``hessian_skipped(state)`` -> refreshes skipped
for a non-finite estimate; all return None for first-order optimizers and work through
``inject_hyperparams``, ``MultiSteps`` and ``apply_if_finite`` states.

rho: ``sophia_lambda`` adjusts it by default (``rho="auto"``, the rho controller of
docs/design.md section 3.5); ``sophia`` and ``sophia_h`` keep the official fixed rho (0.04,
0.01) and accept ``rho="auto"``. ``target_unclipped`` goes with ``rho="auto"`` only.

Non-finite gradients: by default nothing is skipped, so a NaN/Inf gradient enters the
moments and every later update is non-finite (the training loop detects that).
``get_optimizer(name, skip_nonfinite=True)`` wraps the chain in ``optax.apply_if_finite``:
a step with a non-finite gradient returns zero updates and leaves the inner state untouched
(no moment, Hessian or schedule update); after ``NONFINITE_MAX_CONSECUTIVE`` such steps in a
row the update is applied anyway, so a persistently broken run still surfaces.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
from typing import Any, Callable, Mapping, Optional, Union

import optax

from . import transforms

ScalarOrSchedule = Union[float, Callable[[Any], Any]]

NONFINITE_MAX_CONSECUTIVE = 10


def _finish(*parts) -> optax.GradientTransformationExtraArgs:
  return transforms.with_float32_state(optax.chain(*parts))


def adamw(
    learning_rate: ScalarOrSchedule = 3e-4,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.1,
    mask: Optional[Any] = None,
) -> optax.GradientTransformationExtraArgs:
  """AdamW (Loshchilov & Hutter 2019):

      m = b1 m + (1-b1) g ; v = b2 v + (1-b2) g^2 ; m_hat, v_hat bias-corrected
      theta -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * theta)

  ``mask`` selects the decayed leaves (default: ndim >= 2 and not a norm).
  """
  transforms.check_learning_rate(learning_rate)
  transforms.check_beta("b1", b1)
  transforms.check_beta("b2", b2)
  transforms.check_number("eps", eps, low=0.0)
  return _finish(
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
      transforms.add_decoupled_weight_decay(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )


def lion(
    learning_rate: ScalarOrSchedule = 3e-5,
    b1: float = 0.9,
    b2: float = 0.99,
    weight_decay: float = 0.1,
    mask: Optional[Any] = None,
) -> optax.GradientTransformationExtraArgs:
  """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Alg. 2).

  The default learning rate is 10x below the others' 3e-4: the sign update moves every
  coordinate by lr, and the Lion paper recommends a 3-10x smaller rate than AdamW's.

      theta -= lr * (sign(b1 m + (1-b1) g) + wd * theta) ;  then m = b2 m + (1-b2) g
  """
  transforms.check_learning_rate(learning_rate)
  transforms.check_beta("b1", b1)
  transforms.check_beta("b2", b2)
  return _finish(
      optax.scale_by_lion(b1=b1, b2=b2),
      transforms.add_decoupled_weight_decay(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )


def stable_adamw(
    learning_rate: ScalarOrSchedule = 3e-4,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.1,
    mask: Optional[Any] = None,
) -> optax.GradientTransformationExtraArgs:
  """StableAdamW (Wortsman et al. 2023): the AdamW update divided, per tensor, by
  max(1, sqrt(mean(g^2 / max(v_hat, eps^2)))), then decoupled weight decay:

      theta -= lr * (u_adam / max(1, RMS_t) + wd * theta)
  """
  transforms.check_learning_rate(learning_rate)
  return _finish(
      transforms.scale_by_stable_adam(b1=b1, b2=b2, eps=eps),
      transforms.add_decoupled_weight_decay(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )


def lavsm(
    learning_rate: ScalarOrSchedule = 3e-4,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.1,
    mask: Optional[Any] = None,
    variance_clip: float = 0.5,
    role_scales: Optional[dict] = None,
    rules: Optional[Any] = None,
) -> optax.GradientTransformationExtraArgs:
  """LAVSM, layer-adaptive variance-stabilised momentum (LAVSM paper, eqs. 1-5):

      m = b1 m + (1-b1) g ; v = b2 v + (1-b2) g^2          (no bias correction)
      theta -= lr * (s_role * m / (min(sqrt(v), variance_clip) + eps) + wd * theta)

  The paper's eq. (5) writes ``+ lr*wd*theta``; that is a sign error (weight decay shrinks)
  and the decay here is decoupled as in AdamW. s_role: attention 1.8, mlp 1.2, embedding
  1.0, norm 0.7, head 1.0, other 1.0 (``role_scales`` overrides).

  Roles come from the parameter paths (``slj.labels``; ``rules`` adds to the defaults): a
  path no rule gives a role raises ValueError at ``init``, listing every such path; end
  ``rules`` with ``(r".*", "other")`` to scale the rest by 1.0.
  """
  transforms.check_learning_rate(learning_rate)
  return _finish(
      transforms.scale_by_variance_clipped_moments(b1=b1, b2=b2, variance_clip=variance_clip,
                                                   eps=eps),
      transforms.scale_by_role(role_scales, rules),
      transforms.add_decoupled_weight_decay(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )


def lamvs(
    learning_rate: ScalarOrSchedule = 3e-4,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.1,
    mask: Optional[Any] = None,
    role_scales: Optional[dict] = None,
    rules: Optional[Any] = None,
) -> optax.GradientTransformationExtraArgs:
  """LAMVS, "layer-adaptive momentum with variance scaling".

  The papers only name LAMVS ("fixed scaling factors"); this is the project's documented
  reconstruction (docs/design.md): AdamW's bias-corrected moments with LAVSM's fixed role scales,

      theta -= lr * (s_role * m_hat / (sqrt(v_hat) + eps) + wd * theta)

  Roles and ``rules`` as in ``lavsm`` (unknown paths raise at ``init``).
  """
  transforms.check_learning_rate(learning_rate)
  transforms.check_beta("b1", b1)
  transforms.check_beta("b2", b2)
  transforms.check_number("eps", eps, low=0.0)
  return _finish(
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
      transforms.scale_by_role(role_scales, rules),
      transforms.add_decoupled_weight_decay(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )


def _sophia_chain(learning_rate, b1, b2, eps, weight_decay, mask, rho, target_unclipped,
                  batch_tokens, hessian_ema, layer_scale=None, rules=None):
  transforms.check_learning_rate(learning_rate)
  parts = [
      transforms.scale_by_clipped_curvature(b1=b1, rho=rho, eps=eps,
                                            batch_tokens=batch_tokens, hessian=hessian_ema,
                                            target_unclipped=target_unclipped),
  ]
  if layer_scale is not None and layer_scale is not False:
    parts.append(transforms.scale_by_layer_scale(layer_scale, rules))
  parts += [
      transforms.add_decoupled_weight_decay(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  ]
  return _finish(*parts)


def sophia(
    learning_rate: ScalarOrSchedule = 3e-4,
    batch_tokens: Optional[float] = None,
    b1: float = 0.965,
    b2: float = 0.99,
    eps: float = 1e-15,
    weight_decay: float = 0.1,
    mask: Optional[Any] = None,
    rho: Union[float, str] = 0.04,
    hessian_interval: int = 10,
    bias_correction: bool = False,
    target_unclipped: Optional[float] = None,
) -> optax.GradientTransformationExtraArgs:
  """Sophia-G (Liu et al. 2023, "Sophia: A Scalable Stochastic Second-order Optimizer for
  Language Model Pre-training", Alg. 3 with the Gauss-Newton-Bartlett estimator)::

      m = b1 m + (1-b1) g
      on refresh steps (t = 0, interval, 2 interval, ...), first:
          h = b2 h + (1-b2) hessian_fn(params)
      theta -= lr * (clip(m / (rho * B * max(h, 0) + eps), 1) + wd * theta)

  B = ``batch_tokens``: the number of tokens the Hessian estimate was computed from (the
  GNB estimate is g_hat^2 for the gradient g_hat of a token *mean*, so B g_hat^2 estimates
  the Gauss-Newton diagonal per token). With ``slj.hessian`` on the whole step's batch
  that is the tokens per optimizer step over all devices; under ``optax.MultiSteps(k)``
  ``hessian_fn`` sees only the micro-batch of the k-th call, so pass the tokens of one
  micro-batch (all k micro-batches would over-state the curvature k-fold). Required, no
  default: a wrong B silently rescales the update. This equals the published
  SophiaG rule ``ratio = (|m| / (rho*bs*h + 1e-15)).clamp(max=1)``, ``theta *= 1 - lr*wd``,
  ``theta -= lr * sign(m) * ratio``; the only difference is that we refresh h before the
  update, from step 0. ``hessian_fn``: ``slj.hessian.gauss_newton_bartlett`` (returns
  g_hat^2, the batch factor B is applied here).

  ``bias_correction=True`` reads h as h / (1 - b2^k) after k refreshes
  (``transforms.hessian_ema``); the official SophiaG has no such correction.

  rho: the official fixed 0.04 by default; ``rho="auto"`` lets the rho controller hold the
  unclipped fraction at ``target_unclipped`` (``transforms.scale_by_clipped_curvature``,
  docs/design.md section 3.5).
  """
  transforms.check_intervals(hessian_interval, 1, 1)
  return _sophia_chain(
      learning_rate, b1, b2, eps, weight_decay, mask, rho, target_unclipped, batch_tokens,
      transforms.hessian_ema(b2=b2, block_size=1, hessian_interval=hessian_interval,
                             adaptive_interval=False, bias_correction=bias_correction))


def sophia_h(
    learning_rate: ScalarOrSchedule = 3e-4,
    b1: float = 0.965,
    b2: float = 0.99,
    eps: float = 1e-12,
    weight_decay: float = 0.1,
    mask: Optional[Any] = None,
    rho: Union[float, str] = 0.01,
    hessian_interval: int = 10,
    bias_correction: bool = False,
    target_unclipped: Optional[float] = None,
) -> optax.GradientTransformationExtraArgs:
  """Sophia-H (Liu et al. 2023, Alg. 3 with the Hutchinson estimator): Sophia with B = 1,

      theta -= lr * (clip(m / (rho * max(h, 0) + eps), 1) + wd * theta)

  ``hessian_fn`` should be ``slj.hessian.hutchinson(loss_fn, key)`` (u * Hu).

  Differences from ``optax.contrib.sophia`` (also a Sophia-H): optax refreshes h *after*
  forming the update (its first update divides by h = 0) at ``count % interval == 0``, we
  refresh before; optax bias-corrects m (m / (1 - b1^t)), we do not (as the reference
  SophiaG); optax divides by max(gamma h, eps), we by rho max(h, 0) + eps; optax applies
  weight decay to every leaf by default, we use the ndim >= 2, non-norm mask; and optax
  estimates the Hessian itself from an ``obj_fn`` extra argument while we take
  ``hessian_fn``. With b1 = 0 (no bias correction to differ) and a constant curvature, our
  update at step t equals optax's at step t + 1 (tests/test_optimizers.py checks this).
  ``bias_correction`` as in ``sophia``. rho: the official fixed 0.01 by default;
  ``rho="auto"`` and ``target_unclipped`` as in ``sophia``.
  """
  transforms.check_intervals(hessian_interval, 1, 1)
  return _sophia_chain(
      learning_rate, b1, b2, eps, weight_decay, mask, rho, target_unclipped, 1,
      transforms.hessian_ema(b2=b2, block_size=1, hessian_interval=hessian_interval,
                             adaptive_interval=False, bias_correction=bias_correction))


def sophia_lambda(
    learning_rate: ScalarOrSchedule = 3e-4,
    batch_tokens: Optional[float] = None,
    b1: float = 0.965,
    b2: float = 0.99,
    eps: float = 1e-15,
    weight_decay: float = 0.1,
    mask: Optional[Any] = None,
    rho: Union[float, str] = "auto",
    hessian_interval: int = 10,
    block_size: int = 64,
    adaptive_interval: bool = False,
    min_interval: int = 2,
    max_interval: int = 100,
    r_low: float = 0.002,
    r_high: float = 0.02,
    layer_scale: Union[bool, None, Callable[[Any], Any]] = True,
    bias_correction: bool = True,
    rules: Optional[Any] = None,
    target_unclipped: Optional[float] = None,
) -> optax.GradientTransformationExtraArgs:
  """Sophia-Lambda (Sophia-Lambda paper, eqs. 1-2): Sophia-G with a block-wise Hessian EMA,
  a layer scale and an optional adaptive refresh interval::

      m = b1 m + (1-b1) g
      on refresh steps: h_blk = b2 h_blk + (1-b2) block_mean(hessian_fn(params))
      theta -= lr * (lambda_l * clip(m / (rho * B * max(expand(h_blk), 0) + eps), 1)
                     + wd * theta)

  * Blocks: along the last axis of leaves with ndim >= 2 and n >= 2, of the largest divisor
    of n that is <= ``block_size`` (default 64); h is stored as (..., n / block) and
    broadcast, never materialised. ``block_size=1`` is Sophia. Under
    ``inject_hyperparams`` it is read in ``init`` (see the module docstring).
  * ``layer_scale``: lambda_l = c sqrt(d_l / n_l) from ``slj.labels.layer_scales`` (c makes
    the parameter-count-weighted mean 1; clamped to [0.1, 10]); ``None`` turns it off, a
    callable params -> pytree of floats replaces it. d_l is the layer's fan-in and n_l its
    depth, read from paths and shapes; where they cannot be inferred (no indexed blocks or
    layers anywhere, a kernel whose input axes are ambiguous) ``init`` raises ValueError
    naming the paths. ``rules`` (``slj.labels.Rule``: role, input axes, block) settles
    them; ``print(slj.labels.describe(params, rules=rules))`` shows what is read. Roles
    are not needed for every leaf, only to find the embedding.
  * Interval: fixed at ``hessian_interval`` by default. ``adaptive_interval=True`` turns on
    an adaptive rule: from the 4th refresh on the interval doubles (up to
    ``max_interval``) when the relative change r = ||h_after - h_before|| / ||h_before|| is
    below ``r_low`` and halves (down to ``min_interval``) above ``r_high``. The paper names
    an adaptive interval only in a section heading; this rule and its thresholds are the
    project's reconstruction (docs/design.md). Without bias correction r is about 1/k at
    the k-th refresh whatever the curvature does (h starts at 0), so the rule shrinks the
    interval to ``min_interval``; with ``bias_correction=True`` r measures the change of
    the estimate itself.
  * ``bias_correction`` (default on): read h as h / (1 - b2^k) after k refreshes. The
    official SophiaG code has none, and ``sophia`` / ``sophia_h`` keep it off to match it;
    for Sophia-Lambda it is on after a short ablation that changed rho together with it, so
    the correction's own effect is not separated (docs/design.md section 3.4).
  * ``rho="auto"`` (default): rho is not hand-set but adjusted every update by the rho
    controller, so that the fraction of coordinates the clip leaves alone tracks
    ``target_unclipped`` (default ``transforms.DEFAULT_TARGET_UNCLIPPED``, inside the
    Sophia paper's 10-50 % band) whatever the batch size, model or run length; this is the
    project's extension, not the paper's (docs/design.md section 3.5,
    docs/operating-regime.md). A number fixes rho as in Sophia-G (the papers use 0.04).

  The defaults follow the ablations in ``docs/results/`` (``python -m
  experiments.ablations``). The paper's eq. (1) has no eps and no weight decay; we keep
  Sophia-G's.
  """
  return _sophia_chain(
      learning_rate, b1, b2, eps, weight_decay, mask, rho, target_unclipped, batch_tokens,
      transforms.hessian_ema(b2=b2, block_size=block_size, hessian_interval=hessian_interval,
                             adaptive_interval=adaptive_interval, min_interval=min_interval,
                             max_interval=max_interval, r_low=r_low, r_high=r_high,
                             bias_correction=bias_correction),
      layer_scale=layer_scale, rules=rules)


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """Everything the library, the trainer and the comparison tables know about one optimizer.

  Attributes:
    name: the registry key (``get_optimizer(name)``).
    factory: the function building the ``optax`` transformation.
    display_name: the name tables and plots print.
    source: where the update rule comes from (paper, or "reconstruction").
    base_learning_rate: the trainer's peak learning rate for a model of hidden size 128 when
      none is given (scaled 1/width, ``train.config.TrainConfig.resolved_learning_rate``).
    hessian_estimator: None for first-order optimizers; "gnb" or "hutchinson": the
      curvature estimate the trainer hands to ``update`` as ``hessian_fn``.
    needs_batch_tokens: the update multiplies the curvature by ``batch_tokens`` (GNB).
    aliases: other names that resolve to it.
  """
  name: str
  factory: Callable[..., optax.GradientTransformationExtraArgs]
  display_name: str
  source: str
  base_learning_rate: float
  hessian_estimator: Optional[str] = None
  needs_batch_tokens: bool = False
  aliases: tuple[str, ...] = ()

  @property
  def second_order(self) -> bool:
    return self.hessian_estimator is not None

  def hyperparameters(self) -> tuple[str, ...]:
    """The keyword arguments the factory accepts."""
    return tuple(inspect.signature(self.factory).parameters)

  def build(self, skip_nonfinite: Union[bool, int] = False,
            **hyperparams) -> optax.GradientTransformationExtraArgs:
    """The optimizer with ``hyperparams``: ``get_optimizer`` for a record already resolved."""
    unknown = sorted(set(hyperparams) - set(self.hyperparameters()))
    if unknown:
      raise ValueError(f"unknown hyperparameter(s) {unknown} for optimizer {self.name!r}; "
                       f"valid: {list(self.hyperparameters())}")
    tx = self.factory(**hyperparams)
    if skip_nonfinite:
      max_errors = (NONFINITE_MAX_CONSECUTIVE if skip_nonfinite is True
                    else int(skip_nonfinite))
      if max_errors < 1:
        raise ValueError(
            f"skip_nonfinite must be a bool or an int >= 1, got {skip_nonfinite!r}")
      tx = optax.apply_if_finite(tx, max_errors)
    return tx


HESSIAN_ESTIMATORS = ("gnb", "hutchinson")

_REGISTRY: dict[str, OptimizerSpec] = {}
_ALIASES: dict[str, str] = {}

# Read-only, in registration order (the order of tables and plots): name -> OptimizerSpec.
# ``list(OPTIMIZERS)`` is the list of names; ``OPTIMIZERS["sophia"].display_name``.
OPTIMIZERS: Mapping[str, OptimizerSpec] = types.MappingProxyType(_REGISTRY)


def register(spec: OptimizerSpec) -> OptimizerSpec:
  """Adds ``spec`` to the registry: ``get_optimizer``, ``slj train``, ``slj compare`` and the
  tables then know it. A name or alias already taken raises ValueError."""
  if not isinstance(spec, OptimizerSpec):
    raise ValueError(f"register expects an OptimizerSpec, got {type(spec).__name__}")
  if spec.hessian_estimator not in (None,) + HESSIAN_ESTIMATORS:
    raise ValueError(f"OptimizerSpec {spec.name!r}: hessian_estimator must be None or one "
                     f"of {HESSIAN_ESTIMATORS}, got {spec.hessian_estimator!r}")
  for key in (spec.name,) + spec.aliases:
    if key in _REGISTRY or key in _ALIASES:
      raise ValueError(f"optimizer name {key!r} is already registered")
  _REGISTRY[spec.name] = spec
  _ALIASES.update({alias: spec.name for alias in spec.aliases})
  return spec


def unregister(name: str) -> None:
  """Removes a registered optimizer and its aliases (for tests and notebooks)."""
  spec = _REGISTRY.pop(resolve(name).name)
  for alias in spec.aliases:
    _ALIASES.pop(alias, None)


def resolve(name: str) -> OptimizerSpec:
  """The registry record of ``name`` or one of its aliases; unknown names raise ValueError."""
  spec = _REGISTRY.get(_ALIASES.get(name, name)) if isinstance(name, str) else None
  if spec is None:
    raise ValueError(f"unknown optimizer {name!r}; valid names: "
                     f"{', '.join(list(_REGISTRY) + list(_ALIASES))}")
  return spec


def get_optimizer(name: str, skip_nonfinite: Union[bool, int] = False,
                  **hyperparams) -> optax.GradientTransformationExtraArgs:
  """Builds optimizer ``name`` (a key of ``OPTIMIZERS`` or an alias) with ``hyperparams``.

  Unknown names or hyperparameters and invalid values raise ValueError naming them.
  ``skip_nonfinite=True`` (or an int: the number of consecutive bad steps tolerated, default
  ``NONFINITE_MAX_CONSECUTIVE``) wraps the optimizer in ``optax.apply_if_finite``.
  """
  return resolve(name).build(skip_nonfinite, **hyperparams)


# Base learning rates: sign-like updates (Lion, the clipped Sophia family) move every
# coordinate by up to lr, so they get smaller values than the Adam family, as in their papers.
register(OptimizerSpec("adamw", adamw, "AdamW", "Loshchilov & Hutter 2019", 3e-3))
register(OptimizerSpec("lion", lion, "Lion", "Chen et al. 2023", 3e-4))
register(OptimizerSpec("stable_adamw", stable_adamw, "StableAdamW", "Wortsman et al. 2023",
                       3e-3))
register(OptimizerSpec("lavsm", lavsm, "LAVSM", "LAVSM paper, eqs. 1-5", 3e-3))
register(OptimizerSpec("lamvs", lamvs, "LAMVS", "reconstruction (the papers only name it)",
                       3e-3))
register(OptimizerSpec("sophia", sophia, "Sophia (Sophia-G)", "Liu et al. 2023, Alg. 3 (GNB)", 1e-3,
                       hessian_estimator="gnb", needs_batch_tokens=True,
                       aliases=("sophia_g",)))
register(OptimizerSpec("sophia_h", sophia_h, "Sophia-H", "Liu et al. 2023, Alg. 3 (Hutchinson)",
                       1e-3, hessian_estimator="hutchinson"))
register(OptimizerSpec("sophia_lambda", sophia_lambda, "Sophia-Lambda",
                       "Sophia-Lambda paper, eqs. 1-2", 1e-3, hessian_estimator="gnb",
                       needs_batch_tokens=True))


hessian_interval_and_count = transforms.hessian_interval_and_count
clip_fraction = transforms.clip_fraction
hessian_relative_change = transforms.hessian_relative_change
hessian_refresh_due = transforms.hessian_refresh_due
current_rho = transforms.current_rho
hessian_skipped = transforms.hessian_skipped

# What ``sophia_lambda_jax`` re-exports at the top level: the registry and every factory.
__all__ = ["OPTIMIZERS", "OptimizerSpec", "register", "unregister", "resolve",
           "get_optimizer", "hessian_interval_and_count", "clip_fraction",
           "hessian_relative_change", "hessian_refresh_due", "current_rho",
           "hessian_skipped"] + [
               spec.factory.__name__ for spec in _REGISTRY.values()]
