"""sophia-lambda-jax: second-order and layer-adaptive optimizers for language models.

The optimizers are optax chains::

    import sophia_lambda_jax as slj
    tx = slj.sophia_lambda(learning_rate=3e-4, batch_tokens=tokens_per_step)
    updates, state = tx.update(grads, state, params, hessian_fn=hessian_fn)

The optimizer library is imported here: the optimizers and their registry (below), and the
submodules ``transforms``, ``optimizers``, ``hessian`` and ``labels``; it needs only jax,
optax, chex and numpy. The model, data, training, run and comparison stack (``models``,
``data``, ``train``, ``runs``, ``compare``: the ``train`` extra, with flax and orbax) is
imported when first used, as ``slj.models`` or ``import sophia_lambda_jax.models``.
"""

import importlib

from sophia_lambda_jax import hessian, labels, optimizers, transforms
from sophia_lambda_jax.optimizers import (
    OPTIMIZERS,
    OptimizerSpec,
    adamw,
    clip_fraction,
    current_rho,
    get_optimizer,
    hessian_interval_and_count,
    hessian_refresh_due,
    hessian_relative_change,
    hessian_skipped,
    lamvs,
    lavsm,
    lion,
    register,
    resolve,
    sophia,
    sophia_h,
    sophia_lambda,
    stable_adamw,
    unregister,
)

__version__ = "0.1.0"

__all__ = [
    # The optimizers, in the registry's order.
    "adamw", "lion", "stable_adamw", "lavsm", "lamvs", "sophia", "sophia_h", "sophia_lambda",
    # The registry.
    "OPTIMIZERS", "OptimizerSpec", "get_optimizer", "register", "unregister", "resolve",
    # What an optimizer state says (for logging).
    "clip_fraction", "current_rho", "hessian_interval_and_count", "hessian_refresh_due",
    "hessian_relative_change", "hessian_skipped",
    # The optimizer library's modules.
    "transforms", "optimizers", "hessian", "labels",
]

# The `train` extra's stack: imported on first use, so `import sophia_lambda_jax` never
# imports flax or orbax.
_ON_FIRST_USE = ("models", "data", "train", "runs", "compare")


def __getattr__(name):
  if name in _ON_FIRST_USE:
    return importlib.import_module(f".{name}", __name__)
  raise AttributeError(f"module 'sophia_lambda_jax' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_ON_FIRST_USE))
