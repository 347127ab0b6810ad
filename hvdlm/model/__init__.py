"""The GPT (nanoGPT-shaped, built from tensor-parallel layers; tp = 1 is the plain model)."""

from hvdlm.model.gpt import GPT

__all__ = ["GPT"]
