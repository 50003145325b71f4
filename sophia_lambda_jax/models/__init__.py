"""Models: the Flax NNX Qwen2 and its HuggingFace import/export."""
