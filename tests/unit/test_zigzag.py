"""Zigzag sharding, layout validation, and the block-attention pieces of ring attention (1 process)."""

from __future__ import annotations

import pytest
import torch

from lctrain.config import ConfigError, ModelConfig, check_cp_layout, load_config
from lctrain.kernels.softmax_attn import softmax_attention
from lctrain.kernels.softmax_attn.block import attention_mask, block_attn_bwd, block_attn_fwd, merge_partial
from lctrain.layers.attention import AttentionConfig
from lctrain.parallel.context import (
    shard_batch,
    shard_sequence,
    unshard_sequence,
    zigzag_indices,
)
from lctrain.parallel.context.linear import chunk_pieces
from lctrain.parallel.context.zigzag import doc_ids


def test_zigzag_indices_balance_and_cover():
    T, P = 24, 3
    shards = [zigzag_indices(T, P, r) for r in range(P)]
    assert shards[0].tolist() == [0, 1, 2, 3, 20, 21, 22, 23]
    assert shards[2].tolist() == [8, 9, 10, 11, 12, 13, 14, 15]
    assert sorted(torch.cat(shards).tolist()) == list(range(T))
    # causal work (number of visible keys) is the same on every rank
    assert len({int((s + 1).sum()) for s in shards}) == 1
    x = torch.randn(2, T, 5)
    assert torch.equal(unshard_sequence([shard_sequence(x, P, r) for r in range(P)]), x)
    with pytest.raises(ValueError, match="divisible by 2 x cp_degree"):
        zigzag_indices(20, 3, 0)


def test_shard_batch_keeps_true_positions_and_global_cu_seqlens():
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    batch = {"input_ids": torch.arange(8)[None], "labels": torch.tensor([[1, 2, -100, 4, 5, 6, 7, -100]]),
             "position_ids": None, "cu_seqlens": cu, "num_tokens": 6}
    s1 = shard_batch(batch, 2, 1)
    assert s1["input_ids"].tolist() == [[2, 3, 4, 5]]
    assert s1["position_ids"].tolist() == [[2, 0, 1, 2]]
    assert s1["labels"].tolist() == [[-100, 4, 5, 6]]
    assert s1["cu_seqlens"] is cu
    assert doc_ids(cu, torch.tensor([0, 2, 3, 7])).tolist() == [0, 0, 1, 1]


def test_chunk_pieces_split_at_document_starts():
    cu = torch.tensor([0, 5, 8, 16], dtype=torch.int32)  # T = 16, P = 2 -> chunks of 4
    assert chunk_pieces(cu, 16, 2, 0) == ([4], False)
    assert chunk_pieces(cu, 16, 2, 1) == ([1, 3], True)
    assert chunk_pieces(cu, 16, 2, 2) == ([4], False)  # a document starts exactly at token 8
    assert chunk_pieces(cu, 16, 2, 3) == ([4], True)
    assert chunk_pieces(None, 16, 2, 3) == ([4], True)


@pytest.mark.parametrize("overrides, match", [
    (["parallel.cp_degree=3"], "multiple of 2 x parallel.cp_degree"),
    (["parallel.cp_degree=4", "parallel.cp_impl=usp", "parallel.ulysses_degree=3"], "must divide parallel.cp_degree"),
    (["parallel.cp_degree=4", "parallel.cp_impl=ulysses", "model.attn.num_heads=6"], "divisible by the Ulysses degree"),
    (["parallel.cp_degree=2", "parallel.cp_impl=ulysses", "parallel.ulysses_degree=4"], "cp_impl=usp"),
    (["parallel.cp_degree=32", "data.seq_len=64"], "halo"),
])
def test_impossible_layouts_fail_at_startup(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(["recipe=hybrid_gdn_3to1", *overrides])


def test_kv_replication_rule():
    assert check_cp_layout(4, "ulysses", 1, 64) == 4
    layout = dict(cp_degree=4, cp_impl="ulysses", ulysses_degree=4, seq_len=64)
    AttentionConfig(num_heads=8, num_kv_heads=2).check_context_parallel(**layout)  # replicate 2 -> 4
    with pytest.raises(ConfigError, match="num_kv_heads=3"):
        AttentionConfig(num_heads=12, num_kv_heads=3).check_context_parallel(**layout)


def test_blocks_merge_to_full_attention_and_backward_matches_autograd():
    """Split keys in 3 blocks (one fully masked for some rows): lse merge == SDPA; block bwd == autograd."""
    g = torch.Generator().manual_seed(0)
    T, Hq, Hkv, D = 12, 4, 2, 8
    q, k, v = (torch.randn(1, T, h, D, generator=g, dtype=torch.float64) for h in (Hq, Hkv, Hkv))
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    idx = torch.arange(T)
    doc = doc_ids(cu, idx)
    scale = D**-0.5
    out = lse = None
    blocks = [idx[8:], idx[:3], idx[3:8]]
    for b in blocks:
        m = attention_mask(idx, b, doc, doc[b])
        o_b, l_b = block_attn_fwd(q, k[:, b], v[:, b], m, scale)
        out, lse = merge_partial(out, lse, o_b, l_b)
    assert torch.isfinite(out).all()
    ref = softmax_attention(q, k, v, cu_seqlens=cu)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)

    qr, kr, vr = (t.clone().requires_grad_(True) for t in (q, k, v))
    dout = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    (softmax_attention(qr, kr, vr, cu_seqlens=cu) * dout).sum().backward()
    delta = (dout.float() * out).sum(-1).transpose(1, 2)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for b in blocks:
        m = attention_mask(idx, b, doc, doc[b])
        a, bk, bv = block_attn_bwd(dout, q, k[:, b], v[:, b], lse, delta, m, scale)
        dq += a
        dk[:, b] += bk
        dv[:, b] += bv
    for got, want in ((dq, qr.grad), (dk, kr.grad), (dv, vr.grad)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_pieces_of_zigzag_blocks():
    """Without documents the zigzag blocks are causal squares or full rectangles (flash-able)."""
    from lctrain.parallel.context.ring import Piece, block_pieces

    runs = [[(0, 0, 4), (4, 12, 4)], [(0, 4, 4), (4, 8, 4)]]  # T=16, P=2: chunks (0, 3) and (1, 2)
    assert block_pieces(runs[1], runs[1], None, True) == [Piece(0, 4, 0, 4, (4,)), Piece(4, 8, 0, 4),
                                                          Piece(4, 8, 4, 8, (4,))]
    assert block_pieces(runs[1], runs[0], None, True) == [Piece(0, 4, 0, 4), Piece(4, 8, 0, 4)]
    assert block_pieces(runs[0], runs[1], None, True) == [Piece(4, 8, 0, 4), Piece(4, 8, 4, 8)]


def test_apply_context_parallel_swaps_sequence_ops_and_refuses_unreachable_mixers():
    """CP reaches a mixer only through its sequence ops: swapped (kernel choice kept) and restored;
    a subclass with its own forward that uses the op is covered; a marked mixer without an op,
    or an op type with no parallel version, is refused."""
    from dataclasses import dataclass
    from types import SimpleNamespace

    from torch import nn

    from lctrain.kernels.ops import SequenceOp, SoftmaxAttentionOp
    from lctrain.layers.attention import Attention
    from lctrain.models import HybridLM
    from lctrain.parallel.context import apply_context_parallel, sequence_ops
    from lctrain.parallel.context.ops import CPSoftmaxAttentionOp

    class Routed(Attention):  # e.g. a routed-attention variant with its own forward, using attn_op
        def forward(self, x, position_ids=None, cu_seqlens=None):
            return super().forward(x, position_ids, cu_seqlens) * 2

    handle = SimpleNamespace(degree=2, group=None)  # the swap itself needs no process group
    model = nn.Sequential(Attention(16, 2, 1, 8, kernels="torch"), Routed(16, 2, 1, 8), nn.Linear(16, 16))
    local_ops = [model[0].attn_op, model[1].attn_op]
    apply_context_parallel(model, handle)
    for layer, local in zip(model[:2], local_ops):
        assert isinstance(layer.attn_op, CPSoftmaxAttentionOp)
        assert layer.attn_op.cp is handle and layer.attn_op.local is local
    assert model[0].attn_op.kernels == "torch" and model[1].attn_op.kernels == "auto"
    apply_context_parallel(model, None)
    assert [model[0].attn_op, model[1].attn_op] == local_ops and type(model[0].attn_op) is SoftmaxAttentionOp

    lm = HybridLM(ModelConfig(vocab_size=32, d_model=16, n_layers=2, layer_pattern="GA",
                              attn=AttentionConfig(num_heads=2, num_kv_heads=1, head_dim=8)))
    apply_context_parallel(lm, handle)
    assert lm.sequence_shards == 2
    assert {type(op).__name__ for *_, op in sequence_ops(lm)} == {"CPShortConvOp", "CPGatedDeltaRuleOp",
                                                                   "CPSoftmaxAttentionOp"}
    with pytest.raises(ValueError, match="true position_ids"):
        lm(torch.zeros(1, 8, dtype=torch.long))
    apply_context_parallel(lm, None)
    assert lm.sequence_shards == 1

    class OpaqueMixer(nn.Module):  # mixes tokens with no sequence op: CP cannot reach it
        is_token_mixer = True

        def forward(self, x):
            return x.cumsum(1)

    with pytest.raises(ConfigError, match="OpaqueMixer.*without a sequence op"):
        apply_context_parallel(nn.Sequential(OpaqueMixer()), handle)

    @dataclass
    class NewOp(SequenceOp):
        kernels: str = "torch"

    class NewMixer(nn.Module):
        def __init__(self):
            super().__init__()
            self.op = NewOp()

    with pytest.raises(ConfigError, match="NewOp, which has no context-parallel version"):
        apply_context_parallel(nn.Sequential(NewMixer()), handle)
