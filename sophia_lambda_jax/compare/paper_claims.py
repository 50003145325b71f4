"""The numbers the two papers claim, as data.

These are claims to compare against, not results: neither paper gives seeds, error bars,
code, or the Sophia/LAMVS/Lion hyperparameters beyond "same hyperparameters", and they
disagree with themselves in places (noted below). `tables.py` prints them next to our
measurements.

Sources (the two papers shipped with the project specification):
  SOPHIA_LAMBDA: "Sophia-Lambda: Layer-Adaptive Second-Order Optimization for Language
    Models", Table 1 (validation loss and memory in GB, 134M Qwen, FineWeb).
  LAVSM: "LAVSM: Layer-Adaptive Variance-Stabilized Momentum for Language Model
    Optimization", Table 1 (validation loss, same model and data).
"""

from __future__ import annotations

from typing import NamedTuple


class Claim(NamedTuple):
  """One row of a paper's table: the method as the paper names it, our optimizer name, and
  the claimed numbers (None where the paper gives none)."""
  method: str
  optimizer: str
  val_loss: float | None
  memory_gb: float | None = None


SOPHIA_LAMBDA_TABLE1: tuple[Claim, ...] = (
    Claim("AdamW", "adamw", 4.927, 31.5),
    Claim("Sophia", "sophia", 5.091, 39.7),
    Claim("LAMVS", "lamvs", 4.822, 37.2),
    Claim("Sophia-Lambda", "sophia_lambda", 4.675, 36.8),
)

LAVSM_TABLE1: tuple[Claim, ...] = (
    Claim("LAMVS", "lamvs", 4.822),
    Claim("LAVSM", "lavsm", 4.899),
    Claim("StableAdamW", "stable_adamw", 4.919),
    Claim("AdamW", "adamw", 4.927),
    Claim("Lion", "lion", 6.114),
)

TABLES: dict[str, tuple[Claim, ...]] = {
    "sophia_lambda_table1": SOPHIA_LAMBDA_TABLE1,
    "lavsm_table1": LAVSM_TABLE1,
}

TABLE_TITLES: dict[str, str] = {
    "sophia_lambda_table1": "Sophia-Lambda paper, Table 1 (validation loss, memory)",
    "lavsm_table1": "LAVSM paper, Table 1 (validation loss)",
}

# Other claims in the text, kept so the tables can print them beside our measurements.
SOPHIA_LAMBDA_HESSIAN_OVERHEAD = 0.15      # "Hessian estimation adds 15% compute overhead"
# "reduces memory usage by 26% compared to full-matrix Sophia"; Table 1's own memory column
# gives less (SOPHIA_LAMBDA_TABLE1_MEMORY_REDUCTION_VS_SOPHIA): the paper disagrees with itself.
SOPHIA_LAMBDA_MEMORY_REDUCTION_VS_SOPHIA = 0.26

# The setting both papers describe (the LAVSM paper is the only one that gives the batch and
# step count; the Sophia-Lambda paper says "FineWeb (100B tokens)", which 512 x 2048 x 50,000
# = 52.4B tokens does not reach).
PAPER_SETTING = {
    "model": "Qwen, 134M parameters",
    "data": "FineWeb",
    "batch_size": 512,
    "seq_len": 2048,
    "steps": 50_000,
    "learning_rate": 3e-4,
    "schedule": "cosine",
    "b1": 0.9,
    "b2": 0.95,
    "weight_decay": 0.1,
    "variance_clip": 0.5,
    "hardware": "one NVIDIA A100",
    "seeds": 1,
}


def claim_for(table: str, optimizer: str) -> Claim | None:
  """The claim of `table` (a key of TABLES) for our optimizer name, or None."""
  if table not in TABLES:
    raise ValueError(f"table must be one of {sorted(TABLES)}, got {table!r}")
  for claim in TABLES[table]:
    if claim.optimizer == optimizer:
      return claim
  return None


# The reduction Table 1 itself gives, 1 - 36.8 / 39.7 GB.
SOPHIA_LAMBDA_TABLE1_MEMORY_REDUCTION_VS_SOPHIA = 1 - (
    claim_for("sophia_lambda_table1", "sophia_lambda").memory_gb
    / claim_for("sophia_lambda_table1", "sophia").memory_gb)
