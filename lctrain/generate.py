"""Autoregressive decoding for :class:`lctrain.models.HybridLM`: per-layer decode state, prefill, sampling.

A decoder-only model generates by feeding its prompt once (*prefill*) and then one token at a
time (*decode*), each layer carrying what it needs from the tokens already seen:

=======================  ==================================================================  =====================
mixer (letter)           decode state                                                        per-token cost
=======================  ==================================================================  =====================
Gated DeltaNet (G)       fp32 state ``S [B, HV, K, V]`` + the last ``conv_size - 1``         O(HV K V), constant
                         pre-convolution inputs of each of the q, k, v short convolutions
Lightning (L)            fp32 state ``S [B, H, Dh, Dh]``                                     O(H Dh^2), constant
softmax attention (A)    KV cache ``k, v [B, L, Hkv, Dh]`` (keys after RoPE)                 O(L)
MoH (H), MoA (E)         KV cache as A (routing is per token: recomputed from the new x)     O(L)
MoBA (M)                 KV cache as A; the query attends its own (partial) block causally   O(L)
                         plus the ``top_k - 1`` complete past blocks with the highest
                         ``q . mean(K_block)`` (ties to the lower block), as
                         :mod:`lctrain.kernels.moba.naive`
=======================  ==================================================================  =====================

FFNs (dense SwiGLU and :class:`lctrain.layers.moe.MoE`) are per token and need no state. An MoE
with ``capacity_factor > 0`` drops tokens depending on the whole batch of tokens it sees, so its
decoded logits can differ from a full forward; decode equality holds for dropless MoE.

Design: the decode rules are functions in this module, looked up by the mixer's class (and its
base classes) in :data:`DECODERS`, so the layer files keep their training code only and import
nothing new. A mixer may instead carry its own rules as two methods, which then win:
``init_decode_state(batch, device, dtype)`` and ``decode_step(x, state, position) -> (y, state)``;
a new mixer can also be added with :func:`register_decoder`. Every step takes ``x [B, t, D]``
(``t = 1`` to decode, ``t > 1`` to prefill a chunk) and ``position``, the number of tokens the
state has already consumed (every row of the batch at the same position: prompts of one batch
have equal lengths, there is no padding). The first chunk (``position == 0``) goes through the
layer's own sequence op (the training kernel), later chunks through the recurrent update / the
cached attention here.

Entry points: :func:`init_cache`, :func:`forward_step` (logits of ``t`` new tokens, advancing the
cache), :func:`prefill`, :func:`sample_next` (greedy, temperature, top-k, top-p) and
:func:`generate`. All run without gradients on a single device (an unwrapped model; not under
context parallelism).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lctrain.kernels.norm import l2norm
from lctrain.layers.attention import Attention
from lctrain.layers.gated_deltanet import GatedDeltaNet
from lctrain.layers.lightning import LightningAttention
from lctrain.layers.moa import MoAttention
from lctrain.layers.moba import MoBAAttention
from lctrain.layers.moh import MoHAttention
from lctrain.layers.norm import rms_norm

__all__ = [
    "DECODERS", "DecodeCache", "KVCache", "LinearState", "MixerDecoder", "decode_consistency", "forward_step",
    "generate",
    "init_cache", "mixer_init_state", "mixer_step", "prefill", "register_decoder", "sample_next",
]


# --------------------------------------------------------------------------------------------- states
@dataclass
class KVCache:
    """Keys and values of the tokens seen so far, for one softmax-attention layer.

    Attributes:
        k, v: ``[B, capacity, Hkv, Dh]`` buffers in the model dtype (keys after RoPE); the first
            ``length`` positions are filled. The capacity doubles when full.
        length: tokens stored.
    """

    k: torch.Tensor
    v: torch.Tensor
    length: int = 0

    @classmethod
    def empty(cls, batch: int, heads: int, head_dim: int, device, dtype, capacity: int = 256) -> KVCache:
        """A cache with room for ``capacity`` tokens (grown on demand)."""
        shape = (batch, max(1, capacity), heads, head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v [B, t, Hkv, Dh]`` after the cached tokens; returns views of all ``length + t`` of them.

        Raises:
            ValueError: ``k``/``v`` shapes that do not match the cache.
        """
        B, t = k.shape[:2]
        if k.shape[0] != self.k.shape[0] or k.shape[2:] != self.k.shape[2:] or v.shape != k.shape:
            raise ValueError(f"KVCache{tuple(self.k.shape)} cannot take k{tuple(k.shape)} v{tuple(v.shape)}")
        need = self.length + t
        if need > self.k.shape[1]:
            cap = max(need, 2 * self.k.shape[1])
            grow = (B, cap - self.k.shape[1], *self.k.shape[2:])
            self.k = torch.cat((self.k, self.k.new_zeros(grow)), 1)
            self.v = torch.cat((self.v, self.v.new_zeros(grow)), 1)
        self.k[:, self.length:need] = k.to(self.k.dtype)
        self.v[:, self.length:need] = v.to(self.v.dtype)
        self.length = need
        return self.k[:, :need], self.v[:, :need]


@dataclass
class LinearState:
    """Recurrent state of one linear-attention layer (Gated DeltaNet or Lightning).

    Attributes:
        S: fp32 ``[B, H, K, V]`` state (``S_t`` of the layer's recurrence).
        conv: short-convolution caches by name (``"q"``, ``"k"``, ``"v"``), each ``[B, conv_size - 1,
            C]`` in the model dtype: the last ``conv_size - 1`` inputs of that convolution (zeros
            before the sequence start, which is what the training forward's masking reads).
    """

    S: torch.Tensor
    conv: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class DecodeCache:
    """Decode state of a whole :class:`HybridLM`: one state per block and the tokens consumed.

    Attributes:
        states: per block, what its mixer's ``init_state`` made (updated by :func:`forward_step`).
        position: tokens consumed so far (the position of the next token).
    """

    states: list[Any]
    position: int = 0


@dataclass(frozen=True)
class MixerDecoder:
    """Decode rules of one mixer class.

    Attributes:
        init_state: ``(module, batch, device, dtype) -> state``.
        step: ``(module, x [B,t,D], state, position) -> (y [B,t,D], state)``.
    """

    init_state: Callable[..., Any]
    step: Callable[..., tuple[torch.Tensor, Any]]


DECODERS: dict[type, MixerDecoder] = {}


def register_decoder(cls: type, init_state: Callable[..., Any], step: Callable[..., Any]) -> None:
    """Register (or replace) the decode rules of mixer class ``cls`` (subclasses inherit them)."""
    DECODERS[cls] = MixerDecoder(init_state, step)


def _decoder_for(module: nn.Module) -> MixerDecoder:
    for cls in type(module).__mro__:
        if cls in DECODERS:
            return DECODERS[cls]
    known = ", ".join(c.__name__ for c in DECODERS)
    raise NotImplementedError(
        f"no decode rule for {type(module).__name__}: give it init_decode_state(batch, device, dtype) and "
        f"decode_step(x, state, position) methods, or register_decoder(...) in lctrain.generate (known: {known})"
    )


def mixer_init_state(module: nn.Module, batch: int, device, dtype) -> Any:
    """Empty decode state of one mixer for ``batch`` rows (see the module docstring)."""
    own = getattr(module, "init_decode_state", None)
    if callable(own):
        return own(batch, device, dtype)
    return _decoder_for(module).init_state(module, batch, device, dtype)


def mixer_step(module: nn.Module, x: torch.Tensor, state: Any, position: int) -> tuple[torch.Tensor, Any]:
    """Mixer output for ``x [B, t, D]`` continuing ``state`` at ``position``; returns ``(y [B,t,D], state)``.

    Equal (up to float rounding) to rows ``position .. position+t-1`` of the mixer's full forward
    over all tokens. Raises NotImplementedError for a mixer without decode rules.
    """
    own = getattr(module, "decode_step", None)
    if callable(own):
        return own(x, state, position)
    return _decoder_for(module).step(module, x, state, position)


def _positions(x: torch.Tensor, position: int) -> torch.Tensor:
    B, t = x.shape[:2]
    return torch.arange(position, position + t, device=x.device).expand(B, t)


# --------------------------------------------------------------------------------------------- linear layers
def _conv_step(conv: nn.Module, x: torch.Tensor, cache: torch.Tensor, position: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Short convolution of ``x [B,t,C]`` after ``cache [B,K-1,C]``; returns ``(out [B,t,C], new cache)``."""
    out = conv(x, _positions(x, position), cache=cache)
    keep = conv.kernel_size - 1
    if keep == 0:
        return out, cache
    return out, torch.cat((cache.to(x.dtype), x), 1)[:, -keep:]


def _gdn_init(m: GatedDeltaNet, batch: int, device, dtype) -> LinearState:
    H, HV, K, V, c = m.num_heads, m.num_value_heads, m.head_dim, m.head_v_dim, m.conv_size - 1
    return LinearState(
        S=torch.zeros(batch, HV, K, V, device=device, dtype=torch.float32),
        conv={"q": torch.zeros(batch, c, H * K, device=device, dtype=dtype),
              "k": torch.zeros(batch, c, H * K, device=device, dtype=dtype),
              "v": torch.zeros(batch, c, HV * V, device=device, dtype=dtype)},
    )


def _gdn_step(m: GatedDeltaNet, x: torch.Tensor, st: LinearState, position: int) -> tuple[torch.Tensor, LinearState]:
    """Gated DeltaNet: convs continue their caches, then ``S <- exp(g) (I - b k k^T) S + b k v^T``, ``o = S^T q / sqrt(K)``."""
    B, t, _ = x.shape
    H, HV, K, V = m.num_heads, m.num_value_heads, m.head_dim, m.head_v_dim
    cq, ck, cv = st.conv["q"], st.conv["k"], st.conv["v"]
    q, cq = _conv_step(m.q_conv, m.q_proj(x), cq, position)
    k, ck = _conv_step(m.k_conv, m.k_proj(x), ck, position)
    v, cv = _conv_step(m.v_conv, m.v_proj(x), cv, position)
    q, k, v = l2norm(q.view(B, t, H, K)), l2norm(k.view(B, t, H, K)), v.view(B, t, HV, V)
    g, beta = m.gates(x)
    scale = K ** -0.5
    if t == 1:  # one recurrence step in fp32 (the naive reference's update)
        S = st.S * g[:, 0].exp()[..., None, None]
        kf, qf = k[:, 0].float(), q[:, 0].float() * scale
        if HV != H:  # grouped value heads: value head j reads query/key head j // (HV / H)
            kf, qf = kf.repeat_interleave(HV // H, dim=1), qf.repeat_interleave(HV // H, dim=1)
        err = v[:, 0].float() - torch.einsum("bhkv,bhk->bhv", S, kf)
        S = S + torch.einsum("bhk,bhv->bhkv", kf, err * beta[:, 0, :, None])
        o = torch.einsum("bhkv,bhk->bhv", S, qf)[:, None].to(v.dtype)
    else:  # a chunk: the layer's own kernel from the current state
        o, S = m.delta_rule_op.kernel(q)(q, k, v, g, beta, scale=scale, initial_state=st.S, output_final_state=True)
    o = m.o_norm(o, m.g_proj(x).view(B, t, HV, V))
    return m.o_proj(o.reshape(B, t, HV * V)), LinearState(S.float(), {"q": cq, "k": ck, "v": cv})


def _lightning_init(m: LightningAttention, batch: int, device, dtype) -> LinearState:
    Dh = m.head_dim
    return LinearState(S=torch.zeros(batch, m.num_heads, Dh, Dh, device=device, dtype=torch.float32))


def _lightning_step(m: LightningAttention, x: torch.Tensor, st: LinearState,
                    position: int) -> tuple[torch.Tensor, LinearState]:
    """Lightning Attention: ``S <- exp(-slope) S + k v^T``, ``o = S^T q / sqrt(Dh)``."""
    B, t, _ = x.shape
    H, Dh = m.num_heads, m.head_dim
    q, k, v = F.silu(m.qkv_proj(x)).view(B, t, 3, H, Dh).unbind(2)
    if t == 1:
        lam = torch.exp(-m.slope.float())[None, :, None, None]
        S = lam * st.S + k[:, 0].float()[..., :, None] * v[:, 0].float()[..., None, :]
        o = torch.einsum("bhk,bhkv->bhv", q[:, 0].float() * Dh ** -0.5, S)[:, None].to(v.dtype)
    else:
        o, S = m.lightning_op.kernel(q)(q, k, v, m.slope, initial_state=st.S, output_final_state=True)
    o = rms_norm(o, m.o_norm_weight, m.norm_eps) * torch.sigmoid(m.g_proj(x)).view(B, t, H, Dh)
    return m.o_proj(o.reshape(B, t, H * Dh)), LinearState(S.float())


# --------------------------------------------------------------------------------------------- attention
def _cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int,
                      allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Causal softmax attention of new queries over cached keys, in fp32.

    Args:
        q: [B, t, Hq, Dh] queries of positions ``q_start .. q_start+t-1``.
        k, v: [B, L, Hkv, Dh] keys/values of positions ``0 .. L-1`` (``L = q_start + t``), GQA:
            query head ``h`` reads kv head ``h // (Hq / Hkv)``.
        q_start: position of ``q[:, 0]``.
        allowed: optional bool [B, Hq, t, L] extra mask (MoBA's block selection), ANDed with causality.

    Returns:
        [B, t, Hq, Dh] in q's dtype.
    """
    t, Hq, Dh = q.shape[1:]
    L, Hkv = k.shape[1], k.shape[2]
    kr = k.float().repeat_interleave(Hq // Hkv, dim=2)
    vr = v.float().repeat_interleave(Hq // Hkv, dim=2)
    s = torch.einsum("bthd,blhd->bhtl", q.float(), kr) * Dh ** -0.5
    qpos = torch.arange(q_start, q_start + t, device=q.device)
    mask = torch.arange(L, device=q.device)[None, :] <= qpos[:, None]  # [t, L]
    mask = mask[None, None] if allowed is None else mask[None, None] & allowed
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.einsum("bhtl,blhd->bthd", p, vr).to(q.dtype)


def _moba_allowed(q: torch.Tensor, k: torch.Tensor, q_start: int, block_size: int, top_k: int) -> torch.Tensor:
    """MoBA key mask bool [B, Hq, t, L] for queries at ``q_start ..`` over cached keys ``k [B, L, Hkv, Dh]``.

    Own block (``pos // block_size``): allowed (causality is applied by the caller); past blocks
    ``j < own``: the ``top_k - 1`` best by ``q . mean(K_j)`` in fp32, ties to the lower index.
    """
    B, t, Hq, Dh = q.shape
    L, Hkv = k.shape[1], k.shape[2]
    dev = q.device
    qpos = torch.arange(q_start, q_start + t, device=dev)
    own = qpos // block_size  # [t]
    key_blk = torch.arange(L, device=dev) // block_size  # [L]
    nb = L // block_size  # complete blocks: every past block of every query is one of them
    chosen = torch.zeros(B, Hq, t, nb + 1, dtype=torch.bool, device=dev)
    if nb > 0 and top_k > 1:
        means = k[:, : nb * block_size].float().view(B, nb, block_size, Hkv, Dh).mean(2)
        means = means.repeat_interleave(Hq // Hkv, dim=2)  # [B, nb, Hq, Dh]
        scores = torch.einsum("bthd,bjhd->bhtj", q.float(), means)  # [B, Hq, t, nb]
        past = torch.arange(nb, device=dev)[None, :] < own[:, None]  # [t, nb]
        scores = scores.masked_fill(~past, float("-inf"))
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(nb, device=dev).expand_as(order))
        chosen[..., :nb] = (rank < top_k - 1) & past
    chosen[..., :] |= torch.arange(nb + 1, device=dev)[None, :] == own[:, None].clamp(max=nb)  # own block
    return chosen.gather(-1, key_blk.expand(B, Hq, t, L))


def _kv_init(m: nn.Module, batch: int, device, dtype, kv_heads: int) -> KVCache:
    return KVCache.empty(batch, kv_heads, m.head_dim, device, dtype)


def _attn_core(m: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache,
               position: int) -> torch.Tensor:
    """Store k, v; attend (the layer's op for a first chunk, the cached path otherwise)."""
    k_all, v_all = cache.append(k, v)
    if position == 0 and q.shape[1] > 1:
        return m.attn_op(q, k, v, None)
    allowed = None
    if isinstance(m, MoBAAttention):
        allowed = _moba_allowed(q, k_all, position, m.block_size, m.top_k)
    return _cached_attention(q, k_all, v_all, position, allowed)


def _attention_step(m: Attention, x: torch.Tensor, cache: KVCache, position: int) -> tuple[torch.Tensor, KVCache]:
    """Softmax attention (and MoBA, its subclass) with a KV cache (QK-norm and partial RoPE included)."""
    B, t, _ = x.shape
    Hq, Dh = m.num_heads, m.head_dim
    q, k, v = m.project_qkv(x, _positions(x, position))
    o = _attn_core(m, q, k, v, cache, position)
    if m.g_proj is not None:
        o = o * torch.sigmoid(m.g_proj(x)).view(B, t, Hq, Dh)
    return m.o_proj(o.reshape(B, t, Hq * Dh)), cache


def _moh_step(m: MoHAttention, x: torch.Tensor, cache: KVCache, position: int) -> tuple[torch.Tensor, KVCache]:
    """MoH: head weights routed from the new tokens, attention over the cache, weighted heads (reference path)."""
    B, t, D = x.shape
    H, Dh = m.num_heads, m.head_dim
    q = m.q_proj(x).view(B, t, H, Dh)
    k = m.k_proj(x).view(B, t, m.num_kv_heads, Dh)
    v = m.v_proj(x).view(B, t, m.num_kv_heads, Dh)
    routing = m.route(x.reshape(B * t, D), q.reshape(B * t, H, Dh))
    q, k = m.rope(q, k, _positions(x, position))
    o = _attn_core(m, q, k, v, cache, position)
    if m.g_proj is not None:
        o = o * torch.sigmoid(m.g_proj(x)).view(B, t, H, Dh)
    o = o * routing.weights.to(o.dtype).view(B, t, H, 1)
    return m.o_proj(o.reshape(B, t, H * Dh)), cache


def _moa_init(m: MoAttention, batch: int, device, dtype) -> KVCache:
    return _kv_init(m, batch, device, dtype, m.cfg.num_kv_heads_total)


def _moa_step(m: MoAttention, x: torch.Tensor, cache: KVCache, position: int) -> tuple[torch.Tensor, KVCache]:
    """MoA: expert gate from the new tokens, every expert's heads over the shared cache, gated sum."""
    _, _, gate, _ = m.route(x)
    q, k, v = m.project_qkv(x, _positions(x, position))
    return m.merge_heads(_attn_core(m, q, k, v, cache, position), x, gate), cache


register_decoder(GatedDeltaNet, _gdn_init, _gdn_step)
register_decoder(LightningAttention, _lightning_init, _lightning_step)
register_decoder(Attention, lambda m, b, d, dt: _kv_init(m, b, d, dt, m.num_kv_heads), _attention_step)
register_decoder(MoHAttention, lambda m, b, d, dt: _kv_init(m, b, d, dt, m.num_kv_heads), _moh_step)
register_decoder(MoAttention, _moa_init, _moa_step)


# --------------------------------------------------------------------------------------------- model
def _param_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def init_cache(model: nn.Module, batch_size: int, device=None, dtype=None) -> DecodeCache:
    """Empty :class:`DecodeCache` of ``model`` (a :class:`HybridLM`) for ``batch_size`` rows.

    ``device``/``dtype`` default to the model's parameters'. Raises ValueError for a model that
    holds a context-parallel shard, NotImplementedError for a mixer without decode rules.
    """
    if getattr(model, "sequence_shards", 1) > 1:
        raise ValueError("decoding needs the whole model on one device, not a context-parallel shard")
    p = next(model.parameters())
    device = p.device if device is None else device
    dtype = p.dtype if dtype is None else dtype
    return DecodeCache([mixer_init_state(b.mixer, batch_size, device, dtype) for b in model.layers])


@torch.no_grad()
def forward_step(model: nn.Module, input_ids: torch.Tensor, cache: DecodeCache) -> torch.Tensor:
    """Logits of ``input_ids [B, t]`` (int) following the ``cache.position`` tokens in ``cache``.

    Updates ``cache`` in place (``position += t``). Equal, up to float rounding, to rows
    ``position .. position+t-1`` of ``model(all tokens)``. Returns logits [B, t, vocab] in the
    model dtype.

    Raises:
        ValueError: ``input_ids`` not an integer [B, t] tensor with t >= 1 or a batch size other
            than the cache's.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] < 1 or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be an integer tensor [B, t >= 1], got {input_ids.dtype} {tuple(input_ids.shape)}")
    x = model.embed(input_ids)
    for i, block in enumerate(model.layers):
        h, cache.states[i] = mixer_step(block.mixer, block.mixer_norm(x), cache.states[i], cache.position)
        if getattr(block, "parallel_block", False):  # x + mixer(norm(x)) + ffn(norm(x)) (GPT-J / PaLM layout)
            x = x + h + block.ffn(block.ffn_norm(x))
        else:
            x = x + h
            x = x + block.ffn(block.ffn_norm(x))
    cache.position += input_ids.shape[1]
    return model.lm_head(model.norm(x))


@torch.no_grad()
def prefill(model: nn.Module, input_ids: torch.Tensor, cache: DecodeCache, chunk_size: int = 0) -> torch.Tensor:
    """Feed a prompt ``input_ids [B, T]`` into ``cache`` (in chunks of ``chunk_size`` tokens, 0 = one chunk).

    Returns the logits of the last prompt token [B, vocab].
    """
    T = input_ids.shape[1]
    step = T if chunk_size <= 0 else chunk_size
    logits = None
    for s in range(0, T, step):
        logits = forward_step(model, input_ids[:, s:s + step], cache)
    if logits is None:
        raise ValueError("the prompt is empty: generation needs at least one prompt token")
    return logits[:, -1]


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids int64 [B] from ``logits [B, V]``.

    ``temperature <= 0``: greedy (argmax, lowest id on ties). Otherwise sample from
    ``softmax(logits / temperature)`` restricted to the ``top_k`` largest logits (0 = all) and to
    the smallest set of tokens whose probability reaches ``top_p`` (nucleus sampling, Holtzman et
    al. 2020; 1.0 = all; the most likely token always stays), with ``generator`` if given.

    Raises:
        ValueError: ``top_k < 0`` or ``top_p`` outside (0, 1].
    """
    if top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"need top_k >= 0 and 0 < top_p <= 1, got top_k={top_k}, top_p={top_p}")
    if temperature <= 0:
        return logits.argmax(dim=-1)
    z = logits.float() / temperature
    if 0 < top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)
        probs = torch.softmax(sorted_z, dim=-1)
        drop = probs.cumsum(-1) - probs >= top_p  # mass before this token already reaches top_p
        drop[..., 0] = False
        z = z.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    probs = torch.softmax(z, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    prefill_chunk: int = 0,
) -> torch.Tensor:
    """Prefill ``input_ids [B, T]`` then decode up to ``max_new_tokens`` tokens per row.

    Sampling as :func:`sample_next`. With ``eos_id`` a row that produced it keeps emitting
    ``eos_id``, and decoding stops once every row has. The model is put in eval mode for the call
    (and restored).

    Returns:
        int64 [B, T + n] prompt followed by the ``n <= max_new_tokens`` generated tokens.

    Raises:
        ValueError: empty prompt or ``max_new_tokens < 0``; NotImplementedError: a mixer without
            decode rules.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    input_ids = input_ids.to(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        cache = init_cache(model, input_ids.shape[0])
        logits = prefill(model, input_ids, cache, prefill_chunk)
        out: list[torch.Tensor] = []
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for i in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done |= nxt == eos_id
            out.append(nxt)
            if i == max_new_tokens - 1 or (eos_id is not None and bool(done.all())):
                break
            logits = forward_step(model, nxt[:, None], cache)[:, -1]
    finally:
        model.train(was_training)
    if not out:
        return input_ids.long()
    return torch.cat((input_ids.long(), torch.stack(out, 1)), 1)


def decode_consistency(model: nn.Module, input_ids: torch.Tensor, prefill_len: int = 0,
                       chunk: int = 1) -> float:
    """Relative RMS difference between full-forward logits and cached decoding of ``input_ids [B, T]``.

    The first ``prefill_len`` tokens are prefilled in one chunk, the rest fed ``chunk`` tokens at a
    time. A self-check for new mixers (0.0 means identical); model in eval mode, no gradients.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref = model(input_ids).float()
            cache = init_cache(model, input_ids.shape[0])
            parts = []
            if prefill_len > 0:
                parts.append(forward_step(model, input_ids[:, :prefill_len], cache))
            for s in range(prefill_len, input_ids.shape[1], chunk):
                parts.append(forward_step(model, input_ids[:, s:s + chunk], cache))
            got = torch.cat(parts, 1).float()
    finally:
        model.train(was_training)
    return float((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30))

