"""The model architectures the runner builds (the Llama family)."""
