"""sophia-lambda-jax: second-order and layer-adaptive optimizers for language models.

The optimizers are optax chains::

    import sophia_lambda_jax as slj
    tx = slj.sophia_lambda(learning_rate=3e-4, batch_tokens=tokens_per_step)
    updates, state = tx.update(grads, state, params, hessian_fn=hessian_fn)

Public names resolve lazily, so ``import sophia_lambda_jax.data`` (or ``.models``) does not
pull in the optimizer library and the optimizer library never pulls in flax.
"""

import importlib

__version__ = "0.1.0"

_OPTIMIZER_NAMES = (
    "adamw",
    "lion",
    "stable_adamw",
    "lavsm",
    "lamvs",
    "sophia",
    "sophia_h",
    "sophia_lambda",
    "get_optimizer",
    "OPTIMIZERS",
)
_SUBMODULES = ("transforms", "optimizers", "hessian", "labels", "models", "data", "train")

__all__ = list(_OPTIMIZER_NAMES) + list(_SUBMODULES)


def __getattr__(name):
  if name in _OPTIMIZER_NAMES:
    return getattr(importlib.import_module(".optimizers", __name__), name)
  if name in _SUBMODULES:
    return importlib.import_module(f".{name}", __name__)
  raise AttributeError(f"module 'sophia_lambda_jax' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + __all__)
