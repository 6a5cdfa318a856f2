"""MoH, mixture-of-head attention (letter ``H``, section ``model.moh``): each token routes to a subset of heads.

Jin, Zhu, Yuan, Yan, "MoH: Multi-Head Attention as Mixture-of-Head Attention", arXiv:2410.11842
(2024). Multi-head attention written as a sum over heads, ``o = sum_i H^i W_o^i`` (``H^i`` the
``[Dh]`` output of head ``i``, ``W_o^i`` its ``Dh`` columns of the output projection), becomes a
weighted sum over the heads a token selects, ``o = sum_i w_i H^i W_o^i``, with the heads treated
as experts of a mixture of experts.

Heads ``0 .. h_s-1`` are *shared* (every token uses them), heads ``h_s .. H-1`` are the ``E = H -
h_s`` *routed* heads, of which each token uses ``K = top_k``. Per token ``x`` (the layer input,
``[D]``), with bias-free routers evaluated in fp32:

* routed:  ``g = softmax(W_r x)`` over the E routed heads, ``m`` the binary top-K mask of ``g``,
  ``r = K * (g * m) / sum(g * m)`` (zero off the mask, sums to K);
* shared:  ``s = h_s * softmax(W_s x)`` over the shared heads (sums to ``h_s``; with one shared
  head ``s = 1`` and there is no ``W_s``);
* mixing:  ``[a1, a2] = 2 * softmax(W_h x)`` (``W_h: D -> 2``);
* head weights ``w = concat(a1 * s, a2 * r)`` ``[H]``; with ``h_s = 0`` simply ``w = r`` (no
  ``W_h``).

This is the gating of the MoH reference implementation (its factors ``K``, ``h_s`` and 2 make
every weight exactly 1 when the three softmaxes are uniform, so MoH then equals multi-head
attention restricted to the selected heads). The weight multiplies each head's attention output
after the Gated-Attention output gate (``o_i * sigmoid(x W_g)_i * w_i``); both are elementwise
products of the same ``[Dh]`` slice, so the order does not change the result.

Load-balancing loss (the reference implementation's form): ``L_b = E * sum_i me_i * ce_i`` over
the routed heads, ``me_i = mean_tokens g_i`` and ``ce_i`` the fraction of tokens whose top-K
contains head ``i``. Because each token selects K heads, ``sum_i ce_i = K`` and **uniform routing
gives L_b = K, not 1** (the Switch form in :func:`lctrain.layers.routing.load_balancing_loss`
normalises the counts by ``S * K`` and gives 1); ``L_b`` here is ``K`` times that function, which
it reuses (so ``ce`` is counted over ``balance_group`` under context parallelism). The loss,
times ``aux_loss_coeff``, reaches the router gradient through
:class:`~lctrain.layers.routing.AuxLossScaler` with weight ``aux_loss_scale`` (set by the
trainer).

Parameter-free router (``router="param_free"``, how MoH-LLaMA3 is continue-tuned from a dense
checkpoint): the routing logits of a token are the L2 norms ``||q_i||`` of its routed heads'
queries (before RoPE, which preserves norms), standardised over the routed heads
(``(n - mean(n)) / std(n)``, population std); the top-K heads get weight 1 and the others 0, the
shared heads weight 1, and there is no ``a1, a2`` mixing. There are no new parameters: the
layer's parameters are exactly those of :class:`lctrain.layers.attention.Attention`
(``q_proj, k_proj, v_proj, g_proj, o_proj``), so a dense checkpoint loads strictly, and the output
is dense attention with the unselected routed heads zeroed. No balance loss is applied (nothing
to train in the router); routing statistics are still counted.

Compute paths (``MoHConfig.path``):

* ``reference``: every head's attention and output gate are computed, the head outputs are
  multiplied by the ``[S, H]`` weights (zero for unselected heads) and go through the dense
  ``o_proj``: simple and ``torch.compile`` friendly.
* ``selected``: the attention op still runs over all heads (one call of the swappable sequence op,
  needed for context parallelism), but the output gate and the output projection use only the
  ``(token, head)`` pairs a token selected: the pairs are sorted by head and each head's segment
  is projected with its own ``Dh`` columns of ``W_g`` / ``W_o``, then weighted and summed back into
  its token, so those FLOPs scale with ``h_s + K`` active heads instead of ``H``. It reads the
  per-head counts on the host (one device sync per call).
* ``auto``: ``selected`` for CUDA inputs (where skipping inactive heads pays), else
  ``reference`` (the CPU / ``kernels="torch"`` default).

Queries are computed for every head (the attention op needs them for all heads; the param-free
router needs their norms); K/V heads are unchanged, so GQA works as in :class:`Attention` (routed
heads are query heads).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lctrain.errors import ConfigError
from lctrain.kernels.dispatch import check_kernels
from lctrain.kernels.limits import FLASH_MAX_HEAD_DIM, check_max
from lctrain.kernels.moe.dispatch import expert_counts
from lctrain.kernels.moe.grouped import grouped_linear
from lctrain.kernels.ops import SoftmaxAttentionOp
from lctrain.layers.attention import AttentionConfig
from lctrain.layers.rope import RotaryEmbedding, default_position_ids
from lctrain.layers.routing import (
    AuxLossScaler,
    RoutingStats,
    is_recomputing,
    load_balancing_loss,
    topk_route,
)

__all__ = [
    "HeadRouting", "MoHAttention", "MoHConfig", "build_moh", "moh_balance_loss", "moh_flops_per_token",
]

ROUTERS = ("learned", "param_free")
PATHS = ("auto", "reference", "selected")


@dataclass
class MoHConfig:
    """Section ``model.moh``: mixture-of-head attention layers (letter ``H``, :class:`MoHAttention`).

    Attention shape keys as ``model.attn`` (``num_heads`` query heads in total, ``num_kv_heads``
    GQA key/value heads dividing it, even ``head_dim``, ``rope_theta``, ``output_gate``: the
    Gated-Attention sigmoid output gate). ``num_shared_heads`` always-on heads (``0 <= h_s <
    num_heads``; the first ones); ``top_k`` routed heads per token, ``1 <= top_k <= num_heads -
    num_shared_heads`` (defaults: 1 shared + 2 of 3 routed = 75% of the heads active).
    ``router``: ``learned`` (softmax routers ``W_r``, ``W_s``, ``W_h``) or ``param_free`` (query-norm
    routing, no new parameters). ``aux_loss_coeff``: weight of the load-balancing loss (learned
    router; >= 0). ``path``: ``auto`` | ``reference`` | ``selected`` (see the module docstring).
    """

    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    rope_theta: float = 10000.0
    output_gate: bool = True
    num_shared_heads: int = 1
    top_k: int = 2
    router: str = "learned"
    aux_loss_coeff: float = 0.01
    path: str = "auto"

    @property
    def num_routed_heads(self) -> int:
        """E = ``num_heads - num_shared_heads``."""
        return self.num_heads - self.num_shared_heads

    def attention(self) -> AttentionConfig:
        """The attention-shape part of this section (for the checks shared with ``model.attn``)."""
        return AttentionConfig(self.num_heads, self.num_kv_heads, self.head_dim, self.rope_theta, self.output_gate)

    def check_kernel_limits(self, choice: dict[str, str], prefix: str = "model.moh") -> None:
        """Start-up check of the head dim against the softmax kernel the plan picked (``choice``:
        :attr:`lctrain.kernels.plan.KernelPlan.choice`).

        Raises:
            ConfigError: ``head_dim`` above the Triton FlashAttention kernels' limit.
        """
        if choice.get("softmax_attention") == "triton":
            check_max(self.head_dim, FLASH_MAX_HEAD_DIM, f"{prefix}.head_dim", "the Triton FlashAttention kernels")

    def validate(self, prefix: str = "model.moh") -> None:
        """Raise :class:`~lctrain.errors.ConfigError` naming the bad key and what is allowed.

        Checks the attention shape as ``model.attn`` does (positive sizes, ``num_kv_heads`` dividing
        ``num_heads``, even ``head_dim``, ``rope_theta > 0``), then ``0 <= num_shared_heads <
        num_heads``, ``1 <= top_k <= num_heads - num_shared_heads``, ``router`` and ``path`` among
        their choices and ``aux_loss_coeff >= 0``.
        """
        self.attention().validate(prefix)
        if not 0 <= self.num_shared_heads < self.num_heads:
            raise ConfigError(
                f"invalid {prefix}.num_shared_heads={self.num_shared_heads!r}: must be in [0, {prefix}.num_heads - 1 = "
                f"{self.num_heads - 1}] (at least one head must be routed)"
            )
        if not 1 <= self.top_k <= self.num_routed_heads:
            raise ConfigError(
                f"invalid {prefix}.top_k={self.top_k!r}: must be in [1, {prefix}.num_heads - {prefix}.num_shared_heads = "
                f"{self.num_routed_heads}] (routed heads per token)"
            )
        if self.router not in ROUTERS:
            raise ConfigError(f"invalid {prefix}.router={self.router!r}: allowed values are {', '.join(ROUTERS)}")
        if self.path not in PATHS:
            raise ConfigError(f"invalid {prefix}.path={self.path!r}: allowed values are {', '.join(PATHS)}")
        if not self.aux_loss_coeff >= 0:
            raise ConfigError(f"invalid {prefix}.aux_loss_coeff={self.aux_loss_coeff!r}: must be >= 0 (0 disables it)")

    def check_context_parallel(
        self, *, cp_degree: int, cp_impl: str, ulysses_degree: int, seq_len: int, prefix: str = "model.moh"
    ) -> None:
        """The Ulysses head-divisibility rules of :meth:`AttentionConfig.check_context_parallel` (delegated).

        Routing is per token and needs no other layout rule: the weights are applied after the
        (context-parallel) attention op, on the rank's own tokens.

        Raises:
            ConfigError: ``num_heads`` not divisible by the Ulysses degree, or ``num_kv_heads``
                neither dividing nor divisible by it.
        """
        self.attention().check_context_parallel(
            cp_degree=cp_degree, cp_impl=cp_impl, ulysses_degree=ulysses_degree, seq_len=seq_len, prefix=prefix
        )


def moh_balance_loss(probs: torch.Tensor, topk_idx: torch.Tensor, top_k: int, group=None) -> torch.Tensor:
    """MoH load-balancing loss without its coefficient: ``E * sum_i me_i * ce_i`` (fp32 scalar).

    Args:
        probs: fp32 [S, E] routed-head probabilities ``g`` (rows sum to one), differentiable.
        topk_idx: int64 [S, K] selected routed heads (0-based among the routed heads).
        top_k: K.
        group: process group over which ``ce`` is counted (context parallelism), or None.

    ``me_i = mean_s probs[s, i]``, ``ce_i = (tokens selecting i) / S``; equals ``K`` under uniform
    routing. Computed as ``K * load_balancing_loss(probs, topk_idx, E, group)`` (whose counts are
    normalised by ``S * K``).
    """
    return top_k * load_balancing_loss(probs, topk_idx, probs.shape[-1], group)


def moh_flops_per_token(cfg: MoHConfig, seq_len: int) -> float:
    """Training FLOPs per token of the attention maths beyond the parameters: ``6 * H * Dh * T``.

    The same as causal softmax attention with ``H = num_heads`` heads
    (:func:`lctrain.layers.attention.attention_flops_per_token`): both compute paths run the
    attention op over **all** heads (routing only weights the outputs), so this is what is spent,
    not the ``6 * (h_s + K) * Dh * T`` a query-sparse kernel would need. The output-gate and
    output-projection savings of the ``selected`` path are in
    :meth:`MoHAttention.projection_flops_per_token` (the model's ``6 N`` counts them dense).
    """
    return 6.0 * cfg.num_heads * cfg.head_dim * seq_len


@dataclass
class HeadRouting:
    """Routing decision for ``S`` tokens (what :meth:`MoHAttention.route` returns).

    Attributes:
        weights: fp32 [S, H] weight of every head (0 for unselected routed heads).
        heads: int64 [S, A] the ``A = h_s + K`` active heads of each token (shared heads first).
        head_weights: fp32 [S, A] their weights (``weights`` gathered at ``heads``).
        mask: bool [S, E] selected routed heads (exactly K per row).
        topk_idx: int64 [S, K] selected routed heads, indices among the routed heads.
        probs: fp32 [S, E] routed softmax ``g`` (learned router), None for ``param_free``.
        logits: fp32 [S, E] routing logits (``W_r x``, or the standardised query norms).
    """

    weights: torch.Tensor
    heads: torch.Tensor
    head_weights: torch.Tensor
    mask: torch.Tensor
    topk_idx: torch.Tensor
    probs: torch.Tensor | None
    logits: torch.Tensor


class MoHAttention(nn.Module):
    """Causal mixture-of-head attention with GQA, RoPE and the Gated-Attention output gate.

    ``x -> q, k, v = x Wq, x Wk, x Wv -> route(x, q) -> RoPE(q, k) -> attn_op (causal, per
    document) -> [* sigmoid(x Wg)] * head weights -> o_proj`` (see the module docstring for the
    routing formulas and compute paths).

    Args:
        d_model: D.
        num_heads, num_kv_heads, head_dim, rope_theta, output_gate: as :class:`Attention`.
        num_shared_heads: h_s, the first ``h_s`` heads are always on.
        top_k: K routed heads per token among ``E = num_heads - h_s``.
        router: ``"learned"`` | ``"param_free"``.
        aux_loss_coeff: load-balancing loss weight (learned router).
        path: ``"auto"`` | ``"reference"`` | ``"selected"`` (also settable later via ``self.path``).
        kernels: ``"auto"`` | ``"torch"`` | ``"triton"`` for the attention op.

    Parameters: ``q_proj [H*Dh, D]``, ``k_proj``/``v_proj [Hkv*Dh, D]``, ``g_proj [H*Dh, D]`` (if
    gated), ``o_proj [D, H*Dh]`` (names and shapes of :class:`Attention`); learned router only:
    ``router [E, D]`` (W_r), ``shared_router [h_s, D]`` (W_s, only when ``h_s > 1``),
    ``mix_router [2, D]`` (W_h, only when ``h_s > 0``). All bias-free.

    State (not checkpointed): ``routing_stats`` (:class:`RoutingStats` over the E routed heads,
    counted in training with gradients enabled), ``aux_loss_scale`` (set by the trainer),
    ``balance_group`` (set under context parallelism), ``head_counts`` fp64 [H] and
    ``tokens_counted`` fp64 scalar (every forward: tokens that used each head, for
    :meth:`active_head_fraction`; cleared by :meth:`reset_head_counts`).

    ``forward(x [B,T,D], position_ids [B,T] int | None, cu_seqlens int32 [N+1] | None) -> [B,T,D]``
    in the dtype the projections produce (x's, or the autocast dtype); the routers run in fp32.

    Raises:
        ValueError (a :class:`ConfigError`): sizes or choices that :meth:`MoHConfig.validate`
        rejects; inputs of the wrong width. ImportError: ``kernels="triton"`` without triton.

    Sequence op: ``attn_op`` (:class:`lctrain.kernels.ops.SoftmaxAttentionOp`), the seam context
    parallelism swaps from outside.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int = 4,
        num_kv_heads: int = 2,
        head_dim: int = 64,
        rope_theta: float = 10000.0,
        output_gate: bool = True,
        num_shared_heads: int = 1,
        top_k: int = 2,
        router: str = "learned",
        aux_loss_coeff: float = 0.01,
        path: str = "auto",
        kernels: str = "auto",
    ):
        super().__init__()
        cfg = MoHConfig(num_heads, num_kv_heads, head_dim, rope_theta, output_gate, num_shared_heads, top_k, router,
                        aux_loss_coeff, path)
        if d_model < 1:
            raise ConfigError(f"MoHAttention needs d_model >= 1, got {d_model}")
        cfg.validate(prefix="MoHAttention")
        self.cfg = cfg
        self.d_model, self.num_heads, self.num_kv_heads, self.head_dim = d_model, num_heads, num_kv_heads, head_dim
        self.num_shared_heads, self.top_k = num_shared_heads, top_k
        self.num_routed_heads = cfg.num_routed_heads
        self.router_kind, self.aux_loss_coeff, self.path = router, float(aux_loss_coeff), path
        self.kernels = check_kernels(kernels, "mixture-of-head attention")
        self.q_proj = nn.Linear(d_model, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, num_kv_heads * head_dim, bias=False)
        self.g_proj = nn.Linear(d_model, num_heads * head_dim, bias=False) if output_gate else None
        self.o_proj = nn.Linear(num_heads * head_dim, d_model, bias=False)
        self.router = self.shared_router = self.mix_router = None
        if router == "learned":
            self.router = nn.Linear(d_model, self.num_routed_heads, bias=False)
            if num_shared_heads > 1:
                self.shared_router = nn.Linear(d_model, num_shared_heads, bias=False)
            if num_shared_heads > 0:
                self.mix_router = nn.Linear(d_model, 2, bias=False)
        self.rope = RotaryEmbedding(head_dim, rope_theta)
        self.attn_op = SoftmaxAttentionOp(kernels, causal=True)
        self.routing_stats = RoutingStats.zeros(self.num_routed_heads)
        self.aux_loss_scale = 1.0
        self.balance_group = None  # context parallelism: the group counting ce of the balance loss
        self.head_counts = torch.zeros(num_heads, dtype=torch.float64)
        self.tokens_counted = torch.zeros((), dtype=torch.float64)
        self.last_path_selected: bool | None = None  # which path the latest forward took

    # ----------------------------------------------------------------------------------- routing
    @property
    def num_active_heads(self) -> int:
        """A = ``num_shared_heads + top_k`` heads each token uses."""
        return self.num_shared_heads + self.top_k

    def route(self, x: torch.Tensor, q: torch.Tensor) -> HeadRouting:
        """Head weights for ``S`` tokens.

        Args:
            x: [S, D] layer input (learned routers read it).
            q: [S, H, Dh] queries before RoPE (the param-free router reads their norms).

        Returns:
            :class:`HeadRouting` (fp32 weights; differentiable with respect to the learned routers'
            weights and ``x``, constant for the param-free router).
        """
        S = x.shape[0]
        hs, K, E = self.num_shared_heads, self.top_k, self.num_routed_heads
        shared_idx = torch.arange(hs, device=x.device).expand(S, hs)
        with torch.autocast(x.device.type, enabled=False):  # routers in fp32
            if self.router_kind == "learned":
                xf = x.float()
                logits = F.linear(xf, self.router.weight.float())
                probs = torch.softmax(logits, dim=-1)
                routed_w, topk_idx = topk_route(probs, K, norm_topk_prob=True)  # (g*m)/sum(g*m) at the top-k
                routed_w = K * routed_w
                if hs == 0:
                    head_weights = routed_w
                else:
                    if self.shared_router is None:
                        shared_w = xf.new_ones(S, hs)
                    else:
                        shared_w = hs * torch.softmax(F.linear(xf, self.shared_router.weight.float()), dim=-1)
                    a = 2.0 * torch.softmax(F.linear(xf, self.mix_router.weight.float()), dim=-1)
                    head_weights = torch.cat([a[:, :1] * shared_w, a[:, 1:] * routed_w], dim=1)
            else:
                probs = None
                with torch.no_grad():
                    norms = q[:, hs:].float().norm(dim=-1)  # [S, E]
                    mean = norms.mean(-1, keepdim=True)
                    std = norms.std(-1, correction=0, keepdim=True)
                    logits = (norms - mean) / std.clamp_min(1e-6)
                    topk_idx = torch.topk(logits, K, dim=-1, sorted=True).indices
                    head_weights = logits.new_ones(S, hs + K)
        heads = torch.cat([shared_idx, topk_idx + hs], dim=1)
        weights = head_weights.new_zeros(S, self.num_heads).scatter(1, heads, head_weights)
        mask = torch.zeros(S, E, dtype=torch.bool, device=x.device).scatter(1, topk_idx, True)
        return HeadRouting(weights, heads, head_weights, mask, topk_idx, probs, logits)

    # ----------------------------------------------------------------------------------- forward
    def use_selected_path(self, x: torch.Tensor) -> bool:
        """Whether :meth:`forward` takes the selected-heads path for inputs like ``x`` (see ``path``)."""
        if self.path == "selected":
            return True
        return self.path == "auto" and x.is_cuda

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"MoHAttention(d_model={self.d_model}) expects x [B, T, D], got x{tuple(x.shape)}")
        B, T, D = x.shape
        S, H, Dh = B * T, self.num_heads, self.head_dim
        if position_ids is None:
            position_ids = default_position_ids(B, T, cu_seqlens, x.device)
        q = self.q_proj(x).view(B, T, H, Dh)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, Dh)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, Dh)
        x2 = x.reshape(S, D)
        routing = self.route(x2, q.reshape(S, H, Dh))
        q, k = self.rope(q, k, position_ids)
        o = self.attn_op(q, k, v, cu_seqlens)  # [B, T, H, Dh], every head
        self.last_path_selected = S > 0 and self.use_selected_path(x)
        if self.last_path_selected:
            y = self._project_selected(x2, o.reshape(S, H, Dh), routing).view(B, T, D)
        else:
            if self.g_proj is not None:
                o = o * torch.sigmoid(self.g_proj(x)).view(B, T, H, Dh)
            o = o * routing.weights.to(o.dtype).view(B, T, H, 1)
            y = self.o_proj(o.reshape(B, T, H * Dh))
        self._count_heads(routing, x.device)
        if self.training and torch.is_grad_enabled():
            y = self._balance(y, routing, x.device)
        return y

    def _project_selected(self, x: torch.Tensor, o: torch.Tensor, routing: HeadRouting) -> torch.Tensor:
        """Output gate and ``o_proj`` over the selected ``(token, head)`` pairs only.

        Args:
            x: [S, D] layer input (for the gate).
            o: [S, H, Dh] attention output of every head.
            routing: the tokens' :class:`HeadRouting`.

        Returns:
            [S, D]: ``sum over active heads h of w_h * (o_h * sigmoid(x W_g^h)) W_o^h``, accumulated
            in fp32 and returned in the dtype of the projections.
        """
        S, A = routing.heads.shape
        H, Dh = self.num_heads, self.head_dim
        slot_head = routing.heads.reshape(-1)
        order = torch.argsort(slot_head, stable=True)
        token = torch.arange(S, device=o.device).repeat_interleave(A)[order]
        head = slot_head[order]
        weight = routing.head_weights.reshape(-1)[order]
        rows = o[token, head]  # [S*A, Dh], head-major
        counts = expert_counts(slot_head, H)  # on the device: the grouped GEMMs read no host copy
        dtype = rows.dtype
        if torch.is_autocast_enabled(rows.device.type):  # _grouped_mm is not on autocast's cast lists
            dtype = torch.get_autocast_dtype(rows.device.type)
        if self.g_proj is not None:  # gate of head h: x W_g[h*Dh:(h+1)*Dh].T, as [H, D, Dh]
            w_g = self.g_proj.weight.to(dtype).view(H, Dh, -1).transpose(1, 2).contiguous()
            rows = rows.to(dtype) * torch.sigmoid(grouped_linear(x[token].to(dtype), w_g, counts))
        w_o = self.o_proj.weight.to(dtype).view(-1, H, Dh).permute(1, 2, 0).contiguous()  # head h: W_o[:, cols].T
        y = grouped_linear(rows.to(dtype), w_o, counts)
        out = torch.zeros(S, y.shape[1], dtype=torch.float32, device=y.device)
        out = out.index_add(0, token, y.float() * weight[:, None])
        return out.to(y.dtype)

    def _balance(self, y: torch.Tensor, routing: HeadRouting, device: torch.device) -> torch.Tensor:
        """Attach the load-balancing loss (learned router) and count the step's routing statistics."""
        if routing.probs is not None:
            aux = self.aux_loss_coeff * moh_balance_loss(routing.probs, routing.topk_idx, self.top_k,
                                                         self.balance_group)
            if self.aux_loss_coeff > 0 and aux.requires_grad:
                y = AuxLossScaler.apply(y, aux, self.aux_loss_scale)
        else:
            aux = torch.zeros((), dtype=torch.float32, device=device)
        stats = self.routing_stats
        if stats.load.device != device:
            self.routing_stats = stats = (RoutingStats.zeros(stats.num_experts, device) if stats.load.is_meta
                                          else stats.to(device))
        stats.add(routing.topk_idx, aux, torch.zeros((), device=device), None)  # tensors only: no host sync
        return y

    @torch.no_grad()
    def _count_heads(self, routing: HeadRouting, device: torch.device) -> None:
        if is_recomputing():  # activation checkpointing re-running the forward: counted already
            return
        if self.head_counts.device != device:
            meta = self.head_counts.is_meta
            self.head_counts = torch.zeros_like(self.head_counts, device=device) if meta else self.head_counts.to(device)
            self.tokens_counted = (torch.zeros_like(self.tokens_counted, device=device) if meta
                                   else self.tokens_counted.to(device))
        self.head_counts += (routing.weights != 0).sum(0).to(torch.float64)
        self.tokens_counted += float(routing.weights.shape[0])

    @torch.no_grad()
    def after_step(self, stats: RoutingStats) -> None:
        """Routed-layer hook called after each optimizer step with the reduced statistics: nothing to update."""

    # ----------------------------------------------------------------------------------- reports
    def active_head_fraction(self) -> float:
        """Fraction of (token, head) pairs with a non-zero weight over the forwards counted so far.

        Falls back to the nominal ``(num_shared_heads + top_k) / num_heads`` before any token has
        been counted. Both routers select exactly ``top_k`` routed heads per token, so the measured
        value equals the nominal one unless a learned weight underflows to zero. (Host sync.)
        """
        tokens = float(self.tokens_counted)
        if tokens == 0:
            return self.num_active_heads / self.num_heads
        return float(self.head_counts.sum()) / (tokens * self.num_heads)

    @torch.no_grad()
    def reset_head_counts(self) -> None:
        """Clear ``head_counts`` and ``tokens_counted``."""
        self.head_counts.zero_()
        self.tokens_counted.zero_()

    def projection_flops_per_token(self, selected: bool | None = None) -> float:
        """Training (forward + backward) FLOPs per token of the layer's projections and routers.

        ``6 * MACs`` with MACs per token ``D*H*Dh`` (q) ``+ 2*D*Hkv*Dh`` (k, v) ``+ n*Dh*D`` (o) ``+
        n*D*Dh`` (output gate, if any) ``+`` router MACs (learned: ``D*E`` for ``W_r``, ``D*h_s`` for
        ``W_s`` when ``h_s > 1``, ``2*D`` for ``W_h`` when ``h_s > 0``; param-free: 0, its query
        norms are ``~2*E*Dh`` forward FLOPs without backward and are left out), where ``n = h_s +
        K`` on the selected-heads path and ``n = H`` on the reference path. Sequence mixing is
        :meth:`attention_flops_per_token`.

        Args:
            selected: which path to account for; None: the path the latest forward took, or before
                any forward ``path == "selected"`` (``"auto"`` counts as selected only with
                ``kernels="triton"``, since the device is not known yet).
        """
        D, H, Dh, Hkv = self.d_model, self.num_heads, self.head_dim, self.num_kv_heads
        if selected is None:
            selected = self.last_path_selected
        if selected is None:
            selected = self.path == "selected" or (self.path == "auto" and self.kernels == "triton")
        n = self.num_active_heads if selected else H
        macs = D * H * Dh + 2 * D * Hkv * Dh + n * Dh * D
        if self.g_proj is not None:
            macs += n * D * Dh
        if self.router is not None:
            macs += D * self.num_routed_heads
        if self.shared_router is not None:
            macs += D * self.num_shared_heads
        if self.mix_router is not None:
            macs += 2 * D
        return 6.0 * macs

    def attention_flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token of the attention maths: :func:`moh_flops_per_token` (all heads)."""
        return moh_flops_per_token(self.cfg, seq_len)

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"num_shared_heads={self.num_shared_heads}, top_k={self.top_k}, router={self.router_kind!r}, "
            f"output_gate={self.g_proj is not None}, path={self.path!r}, kernels={self.kernels!r}"
        )


def build_moh(cfg: MoHConfig, d_model: int, *, layer_idx: int = 0, n_layers: int = 1, norm_eps: float = 1e-6,
              kernels: str = "auto", **_) -> MoHAttention:
    """Registry builder: a :class:`MoHAttention` layer from its ``model.moh`` section.

    Raises:
        ConfigError: a section :meth:`MoHConfig.validate` rejects (named ``MoHAttention.<key>``).
    """
    return MoHAttention(
        d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, rope_theta=cfg.rope_theta,
        output_gate=cfg.output_gate, num_shared_heads=cfg.num_shared_heads, top_k=cfg.top_k, router=cfg.router,
        aux_loss_coeff=cfg.aux_loss_coeff, path=cfg.path, kernels=kernels,
    )
