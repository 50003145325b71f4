"""Models: the Flax NNX Qwen2 (`qwen`), its sampler (`sampler`), HuggingFace import/export
(`hf`) and `load`, a model and tokenizer from a training run or a HuggingFace directory
(`loading`)."""

from sophia_lambda_jax.models.loading import Loaded, VocabTokenizer, load

__all__ = ["load", "Loaded", "VocabTokenizer"]
