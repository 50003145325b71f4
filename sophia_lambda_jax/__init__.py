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

_SUBMODULES = ("transforms", "optimizers", "hessian", "labels", "models", "data", "train",
               "runs", "compare")

__all__ = list(_SUBMODULES)


def __getattr__(name):
  if name in _SUBMODULES:
    return importlib.import_module(f".{name}", __name__)
  optimizers = importlib.import_module(".optimizers", __name__)
  if name in optimizers.__all__:
    return getattr(optimizers, name)
  raise AttributeError(f"module 'sophia_lambda_jax' has no attribute {name!r}")


def __dir__():
  optimizers = importlib.import_module(".optimizers", __name__)
  return sorted(set(globals()) | set(__all__) | set(optimizers.__all__))
