import math

import pytest
import torch

from hvdlm.config import ModelConfig
from hvdlm.model import GPT

CFG = ModelConfig(n_layer=2, n_head=4, d_model=32, seq_len=16)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return GPT(CFG).eval()


def test_shapes_and_initial_loss_near_uniform(model):
    idx, targets = torch.randint(0, 256, (2, 3, 16))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 16, 256)
    # At init the prediction is close to uniform over 256 bytes: loss ~ ln 256 = 5.55.
    assert abs(loss.item() - math.log(256)) < 0.3


def test_output_head_is_tied_to_the_token_embedding(model):
    assert model.head.weight is model.tok_emb.weight
    assert sum(1 for _ in model.parameters()) == len(dict(model.named_parameters()))


def test_attention_is_causal(model):
    idx = torch.randint(0, 256, (1, 16))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 256
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])  # the past does not see the future
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_same_seed_same_weights():
    torch.manual_seed(5)
    a = GPT(CFG)
    torch.manual_seed(5)
    b = GPT(CFG)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_generate_extends_the_prompt_and_respects_the_context(model):
    prompt = torch.tensor([list(b"def ")])
    out = model.generate(prompt, 20, generator=torch.Generator().manual_seed(1))
    assert out.shape == (1, 24)
    assert torch.equal(out[:, :4], prompt)


def test_a_few_steps_reduce_the_loss():
    torch.manual_seed(0)
    model = GPT(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = torch.randint(0, 256, (4, 16))
    first = None
    for _ in range(20):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
