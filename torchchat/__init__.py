"""torchchat: run Llama-family language models with native PyTorch."""

__version__ = "0.1.0"
