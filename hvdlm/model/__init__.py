"""The GPT (nanoGPT-shaped, built from tensor-parallel layers; tp = 1 is the plain model), as GPT-2 or Llama.

`GPT` is imported on first use (PEP 562): `hvdlm.model.size` is arithmetic that the planner (`hvdlm plan`) reads on
login nodes, and importing this package must not load torch for it.

- gpt: the decoder;
- parts: what the archs differ in (norm, positions, MLP);
- stage: one pipeline stage of it;
- recompute: activation recomputation;
- size: its parameter count from the configuration alone (no torch).
"""

__all__ = ["GPT"]


def __getattr__(name: str):
    if name == "GPT":
        from hvdlm.model.gpt import GPT

        return GPT
    raise AttributeError(f"module 'hvdlm.model' has no attribute {name!r}")
