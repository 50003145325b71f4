"""Models: the Flax NNX Qwen2 (`qwen`), its sampler (`sampler`), HuggingFace import/export
(`hf`) and `load_hf`, a model and its tokenizer from a HuggingFace directory (`loading`).
The model of a training run is `sophia_lambda_jax.runs.load`."""

from sophia_lambda_jax.models.loading import Loaded, VocabTokenizer, load_hf

__all__ = ["load_hf", "Loaded", "VocabTokenizer"]
