"""The model's size from its configuration (no torch), and the trainer's refusal of a model that cannot fit."""

from __future__ import annotations

import pytest

from hvdlm.config import ModelConfig
from hvdlm.model import GPT
from hvdlm.model.size import parameter_count


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 8, 4, 256), (3, 2, 32, 16, 300), (2, 4, 64, 64, 4096)])
def test_parameter_count_is_that_of_the_built_model(shape, bias):
    n_layer, n_head, d_model, seq_len, vocab = shape
    cfg = ModelConfig(n_layer=n_layer, n_head=n_head, d_model=d_model, seq_len=seq_len, vocab_size=vocab, bias=bias)
    model = GPT(cfg)
    assert parameter_count(cfg, vocab_rows=model.tok_emb.weight.shape[0]) == sum(p.numel() for p in model.parameters())


def test_a_model_that_cannot_fit_is_refused_before_anything_is_allocated(hvdlm, tiny_job, tmp_path):
    # 6.4G parameters: about 100 GB of fp32 weights, gradients and AdamW moments, more than any CI machine has.
    r = hvdlm("train", str(tiny_job), "--run-dir", str(tmp_path / "run"), "--set", "model.d_model=16384")
    assert r.code == 2, r.out[-3000:]
    assert "the model does not fit: 6,447.6M parameters need about 96.1 GB per rank" in r.out
    assert "Traceback" not in r.out
    assert not (tmp_path / "run").exists()
