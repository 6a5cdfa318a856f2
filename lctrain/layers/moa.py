"""Mixture of attention experts (MoA) token mixer: letter ``E``, section ``model.moa``.

Each of ``N = num_experts`` experts is a set of attention heads; a router scores the experts per
token and the expert outputs are mixed with the gate ``g [S, N]`` (``S = B * T`` tokens). Two
routing modes:

* ``routing = "topk"``: Mixture of Attention Heads (Zhang, Shen et al., "Mixture of Attention
  Heads: Selecting Attention Heads Per Token", EMNLP 2022). All experts share one K/V
  projection (multi-query attention; ``num_kv_heads_per_expert`` heads, 1 in the paper) and
  each owns a query projection ``W_q^e`` and an output projection ``W_o^e``::

      z_t = x_t W_r                      (router, bias-free, fp32)
      p_t = softmax(z_t)                 [N]
      E_t = top-k(p_t)                   (k = top_k; ties go to the lower expert index)
      y_t = sum_{e in E_t} p_{t,e} W_o^e attn(x_t W_q^e, K, V)

  The selected probabilities are *not* renormalised (the paper weights each selected head by its
  router probability). Gate:
  ``g_{t,e} = p_{t,e}`` if ``e in E_t`` else 0.
* ``routing = "soft"``: the soft mixture of attention experts of BAM (Zhang et al. 2024, "BAM!
  Just Like That: Simple and Efficient Parameter Upcycling for Mixture of Experts"): every
  expert runs on every token and ``y_t = sum_e p_{t,e} Attn_e(x)_t`` with ``g = p``. With
  ``shared_kv = false`` each expert is a whole GQA multi-head attention (its own q, k, v, o:
  ``heads_per_expert`` query heads, ``num_kv_heads_per_expert`` K/V heads); with
  ``shared_kv = true`` one K/V projection (``num_kv_heads_per_expert`` heads) serves all experts
  and each expert owns q and o (BAM's KV-sharing variant).

Here ``attn`` is causal softmax attention with RoPE (:mod:`lctrain.layers.rope`) at explicit
positions, never crossing the documents of ``cu_seqlens``; optional (``output_gate``) each
expert multiplies its attention output by ``sigmoid(x W_g^e)`` as the dense
:class:`lctrain.layers.attention.Attention` does (Qiu et al. 2025, G1), so gated dense layers
upcycle exactly.

How it is computed: every expert's heads go through the attention op in one call (top-k mode
too: unselected experts get gate 0, the dense formulation of a sparse layer; see
:func:`moa_flops_per_token` for the cost), in the ``[B, T, heads, Dh]`` layout with GQA doing
the K/V sharing. Then the gate scales each expert's head outputs and one ``o_proj`` sums them:
``sum_e g_e W_o^e o_e = o_proj(concat_e g_e o_e)``.

Parameter layout (what BAM upcycling writes into; ``Hq = heads_per_expert``, ``Hkv =
num_kv_heads_per_expert``, ``Dh = head_dim``, ``D = d_model``; each block in the dense
:class:`~lctrain.layers.attention.Attention` head order, so expert ``e`` is a plain slice):

=========  =====================  =====================================================
name       shape                  expert ``e`` owns
=========  =====================  =====================================================
q_proj     ``[N*Hq*Dh, D]``       rows ``[e*Hq*Dh, (e+1)*Hq*Dh)``
k_proj     ``[N*Hkv*Dh, D]``      rows ``[e*Hkv*Dh, (e+1)*Hkv*Dh)`` (soft, full experts)
           ``[Hkv*Dh, D]``        all of it, shared (top-k mode; soft with shared_kv)
v_proj     as k_proj              as k_proj
g_proj     ``[N*Hq*Dh, D]``       rows ``[e*Hq*Dh, (e+1)*Hq*Dh)`` (only if output_gate)
o_proj     ``[D, N*Hq*Dh]``       columns ``[e*Hq*Dh, (e+1)*Hq*Dh)``
router     ``weight [N, D]``      row ``e`` (zero-initialised; not part of a dense layer)
=========  =====================  =====================================================

:meth:`MoAttention.expert_weights` returns these slices as views and
:meth:`MoAttention.load_dense_expert` copies a dense Attention state dict into them.

Routed-layer protocol (as :class:`lctrain.layers.moe.MoE`): ``routing_stats``
(:class:`~lctrain.layers.routing.RoutingStats` over ``N`` experts), ``aux_loss_scale``,
``balance_group`` (a process group set from outside under context parallelism) and
``after_step`` (nothing to do here). Losses: Switch load balancing (Fedus et al. 2022,
eq. 4-6, top-k form) with ``aux_loss_coeff`` and ST-MoE router z-loss (Zoph et al. 2022, eq. 5)
with ``z_loss_coeff``, both from :mod:`lctrain.layers.routing`, reach the router's gradient
through :class:`~lctrain.layers.routing.AuxLossScaler`. In soft mode the selections counted
for the balance loss and ``routing_stats.load`` are each token's argmax expert (one slot per
token, ties to the lower index): every expert computes every token there, so the loss only
discourages the gate from collapsing onto one expert; set ``aux_loss_coeff = 0`` to drop it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lctrain.errors import ConfigError
from lctrain.kernels.limits import FLASH_MAX_HEAD_DIM, check_max
from lctrain.kernels.dispatch import check_kernels
from lctrain.kernels.ops import SoftmaxAttentionOp
from lctrain.layers.rope import RotaryEmbedding, default_position_ids
from lctrain.layers.routing import AuxLossScaler, RoutingStats, load_balancing_loss, router_z_loss

__all__ = ["ROUTING_MODES", "MoAConfig", "MoARouter", "MoAttention", "build_moa", "moa_flops_per_token"]

ROUTING_MODES = ("topk", "soft")


@dataclass
class MoAConfig:
    """Section ``model.moa``: mixture-of-attention-experts layers (letter ``E``, :class:`MoAttention`).

    Attributes:
        num_experts: N attention experts.
        top_k: experts per token in ``topk`` mode (1..N); unused in ``soft`` mode.
        routing: ``topk`` (MoA, Zhang et al. 2022: softmax, top-k, no renormalisation, shared
            K/V) or ``soft`` (BAM, Zhang et al. 2024: softmax over all experts, all computed).
        shared_kv: ``soft`` mode only: one K/V projection for all experts (per-expert q, o)
            instead of full experts. ``topk`` mode always shares K/V (the key is ignored there).
        heads_per_expert: Hq query heads per expert (1 in the MoA paper; a BAM expert holds a
            whole dense layer's heads).
        num_kv_heads_per_expert: Hkv key/value heads of each full expert, or of the one shared
            K/V (top-k mode, ``shared_kv``); must divide ``heads_per_expert`` (GQA inside each
            expert). 1 is the MoA paper's single shared K/V head.
        head_dim: Dh (even, for RoPE).
        rope_theta: RoPE base.
        output_gate: per-expert sigmoid output gate ``g_proj`` as in the dense ``model.attn``
            (needed to upcycle gated dense attention layers exactly).
        aux_loss_coeff: Switch load-balancing loss weight (0 disables).
        z_loss_coeff: ST-MoE router z-loss weight (0 disables).
    """

    num_experts: int = 4
    top_k: int = 2
    routing: str = "topk"
    shared_kv: bool = False
    heads_per_expert: int = 1
    num_kv_heads_per_expert: int = 1
    head_dim: int = 64
    rope_theta: float = 10000.0
    output_gate: bool = False
    aux_loss_coeff: float = 0.01
    z_loss_coeff: float = 0.001

    @property
    def kv_shared(self) -> bool:
        """Whether one K/V projection serves every expert (always in top-k mode)."""
        return self.routing == "topk" or bool(self.shared_kv)

    @property
    def num_q_heads_total(self) -> int:
        """Query heads the attention op sees: ``N * heads_per_expert``."""
        return self.num_experts * self.heads_per_expert

    @property
    def num_kv_heads_total(self) -> int:
        """K/V heads the attention op sees: ``Hkv`` when shared, else ``N * Hkv``."""
        n = 1 if self.kv_shared else self.num_experts
        return n * self.num_kv_heads_per_expert

    def check_kernel_limits(self, choice: dict[str, str], prefix: str = "model.moa") -> None:
        """Start-up check of the head dim against the softmax kernel the plan picked (``choice``:
        :attr:`lctrain.kernels.plan.KernelPlan.choice`).

        Raises:
            ConfigError: ``head_dim`` above the Triton FlashAttention kernels' limit.
        """
        if choice.get("softmax_attention") == "triton":
            check_max(self.head_dim, FLASH_MAX_HEAD_DIM, f"{prefix}.head_dim", "the Triton FlashAttention kernels")

    def validate(self, prefix: str = "model.moa") -> None:
        """Raise :class:`~lctrain.errors.ConfigError` naming the bad key and what is allowed."""
        if self.routing not in ROUTING_MODES:
            raise ConfigError(
                f"invalid {prefix}.routing={self.routing!r}: allowed values are {', '.join(ROUTING_MODES)}"
            )
        for key in ("num_experts", "heads_per_expert", "num_kv_heads_per_expert", "head_dim"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"invalid {prefix}.{key}={value!r}: must be a positive integer")
        if self.routing == "topk" and not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(
                f"invalid {prefix}.top_k={self.top_k!r}: must be in [1, {prefix}.num_experts={self.num_experts}] "
                f"with {prefix}.routing=topk"
            )
        if self.heads_per_expert % self.num_kv_heads_per_expert:
            raise ConfigError(
                f"invalid {prefix}.num_kv_heads_per_expert={self.num_kv_heads_per_expert!r}: must divide "
                f"{prefix}.heads_per_expert={self.heads_per_expert} (GQA inside each expert)"
            )
        if self.head_dim % 2:
            raise ConfigError(f"invalid {prefix}.head_dim={self.head_dim!r}: RoPE needs an even head_dim")
        if not self.rope_theta > 0:
            raise ConfigError(f"invalid {prefix}.rope_theta={self.rope_theta!r}: must be > 0")
        for key in ("aux_loss_coeff", "z_loss_coeff"):
            if not getattr(self, key) >= 0:
                raise ConfigError(f"invalid {prefix}.{key}={getattr(self, key)!r}: must be >= 0 (0 disables it)")

    def check_context_parallel(
        self, *, cp_degree: int, cp_impl: str, ulysses_degree: int, seq_len: int, prefix: str = "model.moa"
    ) -> None:
        """Ulysses splits the op's heads over ``ulysses_degree`` ranks (U): check the head counts allow it.

        The attention op sees ``N * heads_per_expert`` query heads and ``num_kv_heads_total`` K/V
        heads (``num_kv_heads_per_expert`` when K/V is shared, ``N *`` that otherwise). Like
        ``model.attn``: the query heads must be divisible by U, and the K/V heads must divide U
        (then each is replicated) or be divisible by it. Ring attention (``cp_impl=ring``) has no
        head constraint.

        Raises:
            ConfigError: the query heads not divisible by U, or the K/V heads neither dividing
                nor divisible by U; the message names ``parallel.cp_impl=ring``.
        """
        U = ulysses_degree
        if U <= 1:
            return
        hq, hkv = self.num_q_heads_total, self.num_kv_heads_total
        if hq % U:
            raise ConfigError(
                f"{prefix}: Ulysses degree {U} must divide the attention heads num_experts * heads_per_expert = "
                f"{self.num_experts} * {self.heads_per_expert} = {hq} (each rank takes {hq}/{U} heads); use "
                f"parallel.cp_impl=ring (no head constraint), a Ulysses degree dividing {hq}, or more "
                f"{prefix}.num_experts / {prefix}.heads_per_expert"
            )
        if hkv % U and U % hkv:
            raise ConfigError(
                f"{prefix}: the {hkv} K/V heads must divide or be divisible by the Ulysses degree {U} (fewer are "
                f"replicated up to {U}); use parallel.cp_impl=ring, or change {prefix}.num_kv_heads_per_expert "
                f"or the Ulysses degree"
            )


class MoARouter(nn.Module):
    """Bias-free linear router ``D -> N`` computed in fp32, initialised (and reset) to zeros.

    A plain module holding ``weight [N, D]`` rather than an ``nn.Linear``: the model's
    initialisation re-draws every ``nn.Linear`` from ``N(0, init_std)`` and calls the
    ``reset_parameters()`` of other lctrain modules, so this keeps the zero init inside a model.
    With zero weights every token starts with uniform probabilities ``1/N``.

    ``forward(x [..., D] any float dtype) -> logits fp32 [..., N]`` (autocast disabled).
    """

    def __init__(self, d_model: int, num_experts: int):
        super().__init__()
        self.in_features, self.out_features = d_model, num_experts
        self.weight = nn.Parameter(torch.zeros(num_experts, d_model))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.weight.float())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias=False, init=zeros"


class MoAttention(nn.Module):
    """Mixture of attention experts (see the module docstring for the maths and parameter layout).

    Args:
        d_model: D.
        cfg: :class:`MoAConfig` (validated here).
        kernels: ``auto`` | ``torch`` | ``triton`` for the softmax attention op.

    Submodules: ``q_proj``, ``k_proj``, ``v_proj``, ``g_proj`` (or None), ``o_proj`` (the
    residual-branch output projection, an ``nn.Linear``), ``router`` (:class:`MoARouter`),
    ``rope``; ``attn_op`` (:class:`lctrain.kernels.ops.SoftmaxAttentionOp`, the seam context
    parallelism swaps from outside).

    ``forward(x [B,T,D], position_ids int [B,T] | None, cu_seqlens int32 [N_docs+1] | None) ->
    [B,T,D]`` in x's (or autocast's) dtype; router logits, probabilities and losses are fp32.
    ``position_ids=None`` means positions within the documents of ``cu_seqlens`` (or ``0..T-1``).

    The op receives ``q [B, T, N*Hq, Dh]`` and ``k, v [B, T, Hkv_total, Dh]``. Full experts: query
    head ``e*Hq + h`` reads K/V head ``e*Hkv + h // (Hq/Hkv)`` by plain GQA. Shared K/V with
    ``Hkv > 1``: the query heads are reordered to (K/V head, expert, head in group) for the op
    and back afterwards, so GQA maps expert ``e``'s head ``h`` to shared K/V head
    ``h // (Hq/Hkv)`` as in a dense layer; with ``Hkv = 1`` (the MoA default) no reordering.

    Raises:
        ConfigError: invalid ``cfg`` (a ValueError); ValueError: ``d_model < 1`` or input shapes;
        ImportError: ``kernels='triton'`` without triton.
    """

    def __init__(self, d_model: int, cfg: MoAConfig, kernels: str = "auto"):
        super().__init__()
        cfg.validate()
        if d_model < 1:
            raise ValueError(f"MoAttention needs d_model >= 1, got {d_model}")
        self.cfg = cfg
        self.d_model = d_model
        self.num_experts, self.top_k, self.routing = cfg.num_experts, cfg.top_k, cfg.routing
        self.heads_per_expert, self.num_kv_heads, self.head_dim = (
            cfg.heads_per_expert, cfg.num_kv_heads_per_expert, cfg.head_dim
        )
        self.kv_shared = cfg.kv_shared
        self.kernels = check_kernels(kernels, "mixture of attention experts")
        N, Hq, Hkv, Dh = self.num_experts, self.heads_per_expert, self.num_kv_heads, self.head_dim
        kv_out = (Hkv if self.kv_shared else N * Hkv) * Dh
        self.q_proj = nn.Linear(d_model, N * Hq * Dh, bias=False)
        self.k_proj = nn.Linear(d_model, kv_out, bias=False)
        self.v_proj = nn.Linear(d_model, kv_out, bias=False)
        self.g_proj = nn.Linear(d_model, N * Hq * Dh, bias=False) if cfg.output_gate else None
        self.o_proj = nn.Linear(N * Hq * Dh, d_model, bias=False)
        self.router = MoARouter(d_model, N)
        self.rope = RotaryEmbedding(Dh, cfg.rope_theta)
        self.attn_op = SoftmaxAttentionOp(kernels, causal=True)
        self.routing_stats = RoutingStats.zeros(N)
        self.aux_loss_scale = 1.0
        self.balance_group = None  # context parallelism: the group counting f_i of the balance loss

    # ------------------------------------------------------------------ routing
    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router maths for ``x [..., D]`` flattened to ``S`` tokens.

        Returns:
            ``(logits fp32 [S, N], probs fp32 [S, N], gate fp32 [S, N], selected int64 [S, K'])``:
            ``gate`` is ``probs`` masked to the top-k experts (top-k mode, not renormalised) or
            ``probs`` itself (soft mode); ``selected`` the top-k experts in descending
            probability (K' = top_k; ties to the lower index, by a stable sort) or each token's
            argmax (K' = 1, soft mode), used for the balance loss and statistics.
        """
        logits = self.router(x.reshape(-1, self.d_model))
        probs = torch.softmax(logits, dim=-1)
        if self.routing == "topk":
            order = torch.sort(probs.detach(), dim=-1, descending=True, stable=True).indices
            selected = order[:, : self.top_k]
            gate = torch.zeros_like(probs).scatter(-1, selected, probs.gather(-1, selected))
        else:
            selected = probs.detach().argmax(dim=-1, keepdim=True)  # first maximum on ties
            gate = probs
        return logits, probs, gate, selected

    # ------------------------------------------------------------------ forward
    def project_qkv(
        self, x: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``q [B,T,N*Hq,Dh], k, v [B,T,Hk,Dh]`` of ``x [B,T,D]`` after RoPE, q in attention head order.

        With a shared K/V and ``num_kv_heads > 1`` the query heads are reordered from the layer's
        (expert, kv head, head) to (kv head, expert, head), so GQA pairs each with its K/V head
        (:meth:`merge_heads` undoes it). Shared by :meth:`forward` and cached decoding.
        """
        B, T, _ = x.shape
        N, Hq, Hkv, Dh = self.num_experts, self.heads_per_expert, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).view(B, T, N * Hq, Dh)
        k = self.k_proj(x).view(B, T, -1, Dh)
        v = self.v_proj(x).view(B, T, -1, Dh)
        q, k = self.rope(q, k, position_ids)
        if self.kv_shared and Hkv > 1:
            q = q.view(B, T, N, Hkv, Hq // Hkv, Dh).transpose(2, 3).reshape(B, T, N * Hq, Dh)
        return q, k, v

    def merge_heads(self, o: torch.Tensor, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """``[B,T,D]`` from attention output ``o [B,T,N*Hq,Dh]`` (head order of :meth:`project_qkv`):
        the output gate, each expert weighted by ``gate [B,T,N]``, summed by ``o_proj``."""
        B, T = x.shape[:2]
        N, Hq, Hkv, Dh = self.num_experts, self.heads_per_expert, self.num_kv_heads, self.head_dim
        if self.kv_shared and Hkv > 1:
            o = o.view(B, T, Hkv, N, Hq // Hkv, Dh).transpose(2, 3)
        o = o.reshape(B, T, N, Hq, Dh)
        if self.g_proj is not None:
            o = o * torch.sigmoid(self.g_proj(x)).view(B, T, N, Hq, Dh)
        o = o * gate.view(B, T, N, 1, 1).to(o.dtype)
        return self.o_proj(o.reshape(B, T, N * Hq * Dh))

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"MoAttention(d_model={self.d_model}) expects x [B, T, {self.d_model}], got {tuple(x.shape)}")
        B, T, _ = x.shape
        N = self.num_experts
        if position_ids is None:
            position_ids = default_position_ids(B, T, cu_seqlens, x.device)
        logits, probs, gate, selected = self.route(x)
        q, k, v = self.project_qkv(x, position_ids)
        y = self.merge_heads(self.attn_op(q, k, v, cu_seqlens), x, gate)

        if self.training and torch.is_grad_enabled():
            cfg = self.cfg
            aux = cfg.aux_loss_coeff * load_balancing_loss(probs, selected, N, self.balance_group)
            z = cfg.z_loss_coeff * router_z_loss(logits)
            total = aux + z
            if total.requires_grad and (cfg.aux_loss_coeff > 0 or cfg.z_loss_coeff > 0):
                y = AuxLossScaler.apply(y, total, self.aux_loss_scale)
            if self.routing_stats.load.device != x.device:
                self.routing_stats.to(x.device)
            self.routing_stats.add(selected, aux, z, None)  # device tensors only: no host sync
        return y

    @torch.no_grad()
    def after_step(self, stats: RoutingStats) -> None:
        """Routed-layer hook after each optimizer step: nothing to update (no bias balancing)."""

    # ------------------------------------------------------------------ experts <-> dense layers
    def expert_weights(self, e: int) -> dict[str, torch.Tensor]:
        """Views of expert ``e``'s weights, keyed like a dense ``Attention.state_dict()``.

        Returns:
            ``{"q_proj.weight": [Hq*Dh, D], "k_proj.weight": [Hkv*Dh, D], "v_proj.weight":
            [Hkv*Dh, D], "o_proj.weight": [D, Hq*Dh]}`` plus ``"g_proj.weight" [Hq*Dh, D]`` when
            gated. With shared K/V the k/v entries are the whole shared projections (writing them
            changes every expert).

        Raises:
            IndexError: ``e`` outside ``[0, num_experts)``.
        """
        if not 0 <= e < self.num_experts:
            raise IndexError(f"expert {e} out of range: this layer has num_experts={self.num_experts}")
        nq, nkv = self.heads_per_expert * self.head_dim, self.num_kv_heads * self.head_dim
        qs = slice(e * nq, (e + 1) * nq)
        kvs = slice(None) if self.kv_shared else slice(e * nkv, (e + 1) * nkv)
        out = {
            "q_proj.weight": self.q_proj.weight[qs],
            "k_proj.weight": self.k_proj.weight[kvs],
            "v_proj.weight": self.v_proj.weight[kvs],
            "o_proj.weight": self.o_proj.weight[:, qs],
        }
        if self.g_proj is not None:
            out["g_proj.weight"] = self.g_proj.weight[qs]
        return out

    @torch.no_grad()
    def load_dense_expert(self, e: int, attention_state_dict: Mapping[str, torch.Tensor] | nn.Module,
                          load_kv: bool = True) -> None:
        """Copy a dense :class:`~lctrain.layers.attention.Attention` into expert ``e`` (BAM upcycling).

        Args:
            e: expert index.
            attention_state_dict: ``Attention.state_dict()`` (or the module) of a layer with
                ``num_heads = heads_per_expert``, ``num_kv_heads = num_kv_heads_per_expert``,
                ``head_dim``, ``d_model`` equal to this layer's, and an output gate exactly when
                ``output_gate``.
            load_kv: with shared K/V, also overwrite the shared k/v projections (every expert's);
                pass False to leave them (e.g. to set them to an average of several dense layers).
                Ignored for full experts (their own k/v are always copied).

        With a one-hot gate on ``e`` the layer then computes exactly what the dense layer does.

        Raises:
            IndexError: ``e`` out of range; ValueError: missing or unexpected keys (an output
            gate on one side only) or mismatched shapes, naming them.
        """
        sd = attention_state_dict.state_dict() if isinstance(attention_state_dict, nn.Module) else attention_state_dict
        targets = self.expert_weights(e)
        missing = sorted(set(targets) - set(sd))
        unexpected = sorted(set(sd) - set(targets))
        if missing or unexpected:
            raise ValueError(
                f"load_dense_expert: dense attention keys do not match this layer's expert (output_gate="
                f"{self.g_proj is not None}): missing {missing}, unexpected {unexpected}"
            )
        for key, dst in targets.items():
            if tuple(sd[key].shape) != tuple(dst.shape):
                raise ValueError(
                    f"load_dense_expert: {key} has shape {tuple(sd[key].shape)}, expert {e} needs {tuple(dst.shape)} "
                    f"(heads_per_expert={self.heads_per_expert}, num_kv_heads_per_expert={self.num_kv_heads}, "
                    f"head_dim={self.head_dim}, d_model={self.d_model})"
                )
        for key, dst in targets.items():
            if self.kv_shared and key in ("k_proj.weight", "v_proj.weight") and not load_kv:
                continue
            dst.copy_(sd[key].to(device=dst.device, dtype=dst.dtype))

    def extra_repr(self) -> str:
        c = self.cfg
        return (
            f"routing={c.routing}, num_experts={c.num_experts}, top_k={c.top_k if c.routing == 'topk' else 'all'}, "
            f"heads_per_expert={c.heads_per_expert}, num_kv_heads={self.num_kv_heads} "
            f"({'shared' if self.kv_shared else 'per expert'}), head_dim={c.head_dim}, output_gate={c.output_gate}, "
            f"kernels={self.kernels!r}"
        )


def build_moa(cfg: MoAConfig, d_model: int, *, layer_idx: int = 0, n_layers: int = 1, norm_eps: float = 1e-6,
              kernels: str = "auto", **_) -> MoAttention:
    """Registry builder: a :class:`MoAttention` layer from its ``model.moa`` section.

    Raises:
        ConfigError: invalid section; ValueError / ImportError as :class:`MoAttention`.
    """
    return MoAttention(d_model, cfg, kernels=kernels)


def moa_flops_per_token(cfg: MoAConfig, seq_len: int) -> float:
    """Training FLOPs per token of the attention maths beyond parameters: ``6 * N * Hq * Dh * T``.

    Causal attention costs ``6 * heads * Dh * T`` per token (``QK^T`` and ``PV``, 2 FLOPs per
    multiply-add over on average T/2 keys, times 3 for forward + backward; as
    :func:`lctrain.layers.attention.attention_flops_per_token`). This layer runs every expert's
    heads (``heads = N * heads_per_expert``) in both modes: top-k mode computes all experts and
    zeroes the unselected ones, so it spends ``N / top_k`` times the ``6 * top_k * Hq * Dh * T``
    a sparse (gathered per-expert) implementation would, and likewise the model's ``6 * params``
    count of the q/o (and gate) projections is what this dense formulation spends (a sparse one
    spends ``top_k / N`` of it). Shared K/V changes no attention FLOPs (GQA: the cost follows the
    query heads).
    """
    return 6.0 * cfg.num_experts * cfg.heads_per_expert * cfg.head_dim * seq_len
