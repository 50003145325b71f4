"""Test-wide setup: every test process sees 8 simulated CPU devices and works offline.

XLA reads the flag when jax initialises its backends, and huggingface_hub reads
HF_HUB_OFFLINE when transformers is imported, so both are set here, before any test module
imports them: a HuggingFace directory must load from its files alone.
"""

import os

_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
