"""Decoding (lctrain.generate): cached step-by-step logits equal one full forward, for every mixer and a hybrid LM."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lctrain.config import ModelConfig
from lctrain.generate import (
    KVCache,
    decode_consistency,
    forward_step,
    generate,
    init_cache,
    mixer_init_state,
    mixer_step,
    sample_next,
)
from lctrain.layers.moe import MoEConfig
from lctrain.models import HybridLM
from tests.conftest import set_dotted

TOL = 1e-5  # relative RMS, fp32


def tiny_cfg(pattern: str, n_layers: int = 1, **over) -> ModelConfig:
    """A small fp32 model config with every mixer section shrunk (torch kernels)."""
    c = ModelConfig(vocab_size=97, d_model=32, n_layers=n_layers, layer_pattern=pattern, kernels="torch")
    c.attn.num_heads, c.attn.num_kv_heads, c.attn.head_dim = 4, 2, 8
    c.gdn.num_heads, c.gdn.head_dim, c.gdn.chunk_size = 2, 8, 8
    c.lightning.num_heads, c.lightning.head_dim, c.lightning.chunk_size = 2, 8, 8
    c.moba.num_heads, c.moba.num_kv_heads, c.moba.head_dim, c.moba.block_size, c.moba.top_k = 4, 2, 8, 4, 2
    c.moh.num_heads, c.moh.num_kv_heads, c.moh.head_dim = 4, 2, 8
    c.moa.num_experts, c.moa.top_k, c.moa.head_dim = 3, 2, 8
    for key, value in over.items():
        set_dotted(c, key, value)
    return c


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt())


MIXER_CASES = {
    "G": {},
    "G-expand2-conv1": {"gdn.expand_v": 2.0, "gdn.conv_size": 1},
    "A": {},
    "A-nogate-mha": {"attn.output_gate": False, "attn.num_kv_heads": 4},
    "L": {},
    "H": {},
    "H-paramfree-noshared": {"moh.router": "param_free", "moh.num_shared_heads": 0, "moh.top_k": 3},
    "E": {},
    "E-soft-sharedkv": {"moa.routing": "soft", "moa.shared_kv": True, "moa.heads_per_expert": 2,
                        "moa.num_kv_heads_per_expert": 2, "moa.output_gate": True},
    "M": {},
    "M-top3": {"moba.top_k": 3, "moba.block_size": 5},
}


def _mixer(case: str) -> nn.Module:
    torch.manual_seed(0)
    cfg = tiny_cfg(case[0], init_std=0.2, **MIXER_CASES[case])
    m = HybridLM(cfg).layers[0].mixer.eval()
    if case[0] == "E":  # the router starts at zero (uniform gates): give it weights so routing matters
        with torch.no_grad():
            m.router.weight.normal_(0, 0.5)
    return m


def _decode(m: nn.Module, x: torch.Tensor, cuts: list[int]) -> torch.Tensor:
    """Feed x [B, T, D] in the chunks ending at ``cuts`` (then one token at a time)."""
    st = mixer_init_state(m, x.shape[0], x.device, x.dtype)
    outs, pos = [], 0
    for end in [*cuts, *range(cuts[-1] + 1 if cuts else 1, x.shape[1] + 1)]:
        y, st = mixer_step(m, x[:, pos:end], st, pos)
        outs.append(y)
        pos = end
    return torch.cat(outs, 1)


@pytest.mark.parametrize("case", list(MIXER_CASES))
def test_mixer_decode_matches_forward(case):
    m = _mixer(case)
    torch.manual_seed(1)
    x = torch.randn(2, 29, 32)
    with torch.no_grad():
        ref = m(x)
        token_by_token = _decode(m, x, [1])
        prefill_chunk_decode = _decode(m, x, [11, 16])  # prefill 11, a 5-token chunk on a filled state, then steps
        wrong = mixer_step(m, x[:, -1:], mixer_init_state(m, 2, x.device, x.dtype), 28)[0]
    assert rel_rms(token_by_token, ref) < TOL
    assert rel_rms(prefill_chunk_decode, ref) < TOL
    assert rel_rms(wrong, ref[:, -1:]) > 1e-2  # the check sees a missing state


def test_moba_decode_uses_the_block_selection():
    """MoBA's selection matters at this size (dense attention with the same weights differs), and decoding follows it."""
    from lctrain.layers.attention import Attention

    m = _mixer("M")
    dense = Attention(32, 4, 2, 8, kernels="torch").eval()
    dense.load_state_dict(m.state_dict())  # MoBA keeps Attention's parameter names
    x = torch.randn(1, 29, 32)
    with torch.no_grad():
        ref = m(x)
        assert rel_rms(dense(x), ref) > 1e-3
        assert rel_rms(_decode(m, x, [1]), ref) < TOL


def hybrid_model() -> HybridLM:
    """Every mixer letter in one stack, MoE FFNs (dropless, shared expert) in every other block."""
    torch.manual_seed(0)
    cfg = tiny_cfg("GMHGALGE", 8, init_std=0.1,
                   moe=MoEConfig(num_experts=4, top_k=2, num_shared_experts=1, layers="every_other"))
    return HybridLM(cfg).eval()


def test_hybrid_decode_matches_forward():
    m = hybrid_model()
    ids = torch.randint(0, 97, (2, 33), generator=torch.Generator().manual_seed(3))
    assert decode_consistency(m, ids) < TOL
    assert decode_consistency(m, ids, prefill_len=17) < TOL
    assert decode_consistency(m, ids, prefill_len=9, chunk=5) < TOL
    # sensitivity: decoding the last token without the cached prefix is far off
    with torch.no_grad():
        ref = m(ids)[:, -1]
        cache = init_cache(m, 2)
        cache.position = 32
        wrong = forward_step(m, ids[:, -1:], cache)[:, -1]
    assert rel_rms(wrong, ref) > 1e-2


def test_parallel_block_layout_decodes():
    cfg = tiny_cfg("GA", 2)
    cfg.parallel_block = True
    torch.manual_seed(0)
    m = HybridLM(cfg).eval()
    ids = torch.randint(0, 97, (1, 20))
    assert decode_consistency(m, ids, prefill_len=7) < TOL


def test_greedy_generate_equals_repeated_full_forward():
    m = hybrid_model()
    prompt = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(4))
    out = generate(m, prompt, 6)
    ref = prompt.clone()
    with torch.no_grad():
        for _ in range(6):
            ref = torch.cat((ref, m(ref)[:, -1].argmax(-1, keepdim=True)), 1)
    assert out.shape == (2, 13)
    assert torch.equal(out, ref)
    chunked = generate(m, prompt, 6, prefill_chunk=3)
    assert torch.equal(chunked, ref)


def test_generate_stops_at_eos_and_keeps_emitting_it():
    m = hybrid_model()
    prompt = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(5))
    first = generate(m, prompt, 1)[:, -1]
    out = generate(m, prompt, 8, eos_id=int(first[0]))
    assert out.shape[1] <= 13
    assert int(out[0, 5]) == int(first[0]) and (out[0, 5:] == first[0]).all()


def test_sample_next_rules():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 0.0]])
    assert sample_next(logits).tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, temperature=1.0, top_k=1, generator=g).tolist() == [1, 0]
    assert sample_next(logits, temperature=1.0, top_p=1e-6, generator=g).tolist() == [1, 0]
    draws = torch.stack([sample_next(logits[:1], temperature=1.0, top_k=2, generator=g) for _ in range(200)])
    assert set(draws.flatten().tolist()) <= {1, 3} and len(set(draws.flatten().tolist())) == 2
    draws = torch.stack([sample_next(logits[:1], temperature=5.0, generator=g) for _ in range(400)])
    assert len(set(draws.flatten().tolist())) == 4
    with pytest.raises(ValueError):
        sample_next(logits, temperature=1.0, top_p=0.0)


def test_kv_cache_grows():
    c = KVCache.empty(1, 2, 4, "cpu", torch.float32, capacity=2)
    for i in range(5):
        k, _ = c.append(torch.full((1, 1, 2, 4), float(i)), torch.full((1, 1, 2, 4), -float(i)))
    assert c.length == 5 and k.shape == (1, 5, 2, 4) and k[0, :, 0, 0].tolist() == [0, 1, 2, 3, 4]


def test_unknown_mixer_names_the_protocol():
    class Odd(nn.Module):
        pass

    with pytest.raises(NotImplementedError, match="decode_step"):
        mixer_init_state(Odd(), 1, "cpu", torch.float32)
