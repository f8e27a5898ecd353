"""nslora: neurosymbolic LoRA — LoRA epochs interleaved with symbolic rewrites of the training data."""

__version__ = "0.1.0"
