"""Quantization with NVIDIA Model Optimizer: recipes (which precision each module gets), per-target
precision gates, and applying or emulating them on a model."""
