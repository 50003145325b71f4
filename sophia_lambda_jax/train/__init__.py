"""Sharded, resumable training of the Qwen model with any optimizer of the library.

    from sophia_lambda_jax import train
    summary = train.run_training(train.TrainConfig(model="qwen-tiny", optimizer="sophia_lambda",
                                                   steps=100, out="runs/demo"))

or `slj train --model qwen-tiny --optimizer sophia_lambda --steps 100 --out runs/demo`.

Modules, one job each: `config` (TrainConfig, flags, JSON, the resolved optimizer),
`schedule` (the learning-rate schedule), `mesh` (device mesh, shardings, jax.distributed),
`step` (the jitted train/eval step), `checkpoint` (orbax), `metrics` (JSONL, TensorBoard,
progress), `flops` (model FLOPs and MFU), `program` (model functions, optimizer, state
shardings, the compiled step, the state a run starts from), `loop` (run_training: the
steps, evaluation, checkpoint cadence, summary; cli_train).
"""

from sophia_lambda_jax.train.config import TrainConfig, config_from_argv
from sophia_lambda_jax.train.loop import cli_train, run_training
from sophia_lambda_jax.train.step import TrainState

__all__ = ["TrainConfig", "TrainState", "config_from_argv", "run_training", "cli_train"]
