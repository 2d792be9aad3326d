"""Model definitions, configs, checkpoint loading, tokenizer and the output schemas."""
