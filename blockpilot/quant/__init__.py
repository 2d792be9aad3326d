"""Model Optimizer quantization recipes and precision gates."""
