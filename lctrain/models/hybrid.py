"""HybridLM: a decoder-only language model mixing linear-attention and softmax-attention layers.

The layer stack follows ``ModelConfig.layer_pattern`` tiled to ``n_layers`` (``G`` = Gated
DeltaNet, ``A`` = softmax attention, ``L`` = Lightning Attention); ``GGGA`` is the 3:1 hybrid of
Gated DeltaNet-H1 (Yang et al., ICLR 2025) and Qwen3-Next, ``LLLLLLLA`` the 7:1 hybrid of MiniMax-01. Every block is pre-norm residual (GPT-2 / Llama layout)::

    x = x + mixer(rmsnorm(x), position_ids, cu_seqlens)
    x = x + swiglu(rmsnorm(x))

followed by a final RMSNorm and the LM head (tied to the token embedding or not).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lctrain.config import LAYER_TYPES, ModelConfig, moe_layer_indices
from lctrain.layers.attention import Attention
from lctrain.layers.conv import ShortConvolution
from lctrain.layers.ffn import SwiGLU, default_ffn_hidden_size
from lctrain.layers.gated_deltanet import GatedDeltaNet
from lctrain.layers.lightning import LightningAttention
from lctrain.layers.moe import MoE
from lctrain.layers.norm import GatedRMSNorm, RMSNorm
from lctrain.layers.rope import check_cu_seqlens, default_position_ids


def expand_layer_pattern(layer_pattern: str, n_layers: int) -> str:
    """Tile ``layer_pattern`` to ``n_layers`` letters (``'GGGA'``, 8 -> ``'GGGAGGGA'``).

    Raises:
        ValueError: empty pattern, a letter other than those of ``LAYER_TYPES`` (G, A), or
            ``n_layers`` not a positive multiple of the pattern length.
    """
    if not layer_pattern:
        raise ValueError(
            "model.layer_pattern is empty; use letters G (Gated DeltaNet), A (softmax attention), L (Lightning)"
        )
    bad = sorted(set(layer_pattern) - set(LAYER_TYPES))
    if bad:
        allowed = ", ".join(f"{k} ({v})" for k, v in LAYER_TYPES.items())
        raise ValueError(
            f"model.layer_pattern={layer_pattern!r} has unknown letters {bad}; allowed: {allowed}"
        )
    if n_layers < 1 or n_layers % len(layer_pattern):
        suggestion = len(layer_pattern) * max(1, round(n_layers / len(layer_pattern)))
        raise ValueError(
            f"model.n_layers={n_layers} must be a positive multiple of len(model.layer_pattern)="
            f"{len(layer_pattern)} ('{layer_pattern}'); e.g. n_layers={suggestion}"
        )
    return layer_pattern * (n_layers // len(layer_pattern))


class HybridBlock(nn.Module):
    """One pre-norm residual block: a token mixer (``kind`` G, A or L) then a SwiGLU FFN.

    Submodules: ``mixer_norm``, ``mixer`` (:class:`GatedDeltaNet`, :class:`Attention` or
    :class:`LightningAttention`; ``layer_idx`` sets the lightning decay slopes),
    ``ffn_norm``, ``ffn`` (:class:`SwiGLU`, or :class:`lctrain.layers.moe.MoE` in the blocks
    chosen by ``model.moe.layers`` when ``model.moe.num_experts > 0``).

    ``forward(x [B,T,D], position_ids [B,T] int, cu_seqlens int32 [N+1] | None) -> [B,T,D]``.
    """

    def __init__(self, kind: str, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.kind = kind
        d = cfg.d_model
        self.mixer_norm = RMSNorm(d, cfg.norm_eps)
        if kind == "G":
            self.mixer: nn.Module = GatedDeltaNet(
                d,
                cfg.gdn_num_heads,
                cfg.gdn_head_dim,
                expand_v=cfg.gdn_expand_v,
                conv_size=cfg.conv_size,
                chunk_size=cfg.chunk_size,
                norm_eps=cfg.norm_eps,
                kernels=cfg.kernels,
            )
        elif kind == "A":
            self.mixer = Attention(
                d,
                cfg.num_heads,
                cfg.num_kv_heads,
                cfg.head_dim,
                rope_theta=cfg.rope_theta,
                output_gate=cfg.attn_output_gate,
                kernels=cfg.kernels,
            )
        elif kind == "L":
            self.mixer = LightningAttention(
                d,
                cfg.num_heads,
                cfg.head_dim,
                layer_idx=layer_idx,
                n_layers=cfg.n_layers,
                chunk_size=cfg.chunk_size,
                norm_eps=cfg.norm_eps,
                kernels=cfg.kernels,
            )
        else:  # expand_layer_pattern already rejected it
            raise AssertionError(kind)
        self.ffn_norm = RMSNorm(d, cfg.norm_eps)
        dense_hidden = default_ffn_hidden_size(d, cfg.ffn_hidden_size)
        if cfg.moe.num_experts > 0 and layer_idx in moe_layer_indices(cfg.moe.layers, cfg.n_layers):
            self.ffn: nn.Module = MoE(d, cfg.moe, dense_hidden)  # model.moe.layers picks the blocks
        else:
            self.ffn = SwiGLU(d, dense_hidden)

    def forward(
        self, x: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x + self.mixer(self.mixer_norm(x), position_ids, cu_seqlens)
        return x + self.ffn(self.ffn_norm(x))

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


class HybridLM(nn.Module):
    """Hybrid Gated DeltaNet / softmax-attention causal language model.

    Args:
        cfg: :class:`lctrain.config.ModelConfig` (all fields are used; see its docstring).

    Submodules: ``embed`` (nn.Embedding [vocab, D]), ``layers`` (ModuleList of
    :class:`HybridBlock`, kinds in :attr:`layer_types`), ``norm`` (final RMSNorm), ``lm_head``
    (Linear D -> vocab; its weight *is* ``embed.weight`` when ``tie_embeddings``).

    Init (:meth:`reset_parameters`; call it again after ``to_empty`` on a meta-device model):
    every Linear and the embedding ``N(0, init_std)``; the output projection of each residual
    branch (``mixer.o_proj``, ``ffn.down_proj``) ``N(0, init_std / sqrt(2 * n_layers))``
    (GPT-2, Radford et al. 2019, Sec. 2.3); norm scales 1; short convolutions
    ``U(+-1/sqrt(conv_size))``; Gated DeltaNet ``A_log``/``dt_bias`` as in
    :meth:`GatedDeltaNet.reset_decay_parameters`.

    Activation checkpointing (``cfg.activation_checkpointing``): each block is recomputed in
    backward (``torch.utils.checkpoint``, ``use_reentrant=False``) when gradients are enabled.

    Raises:
        ValueError: bad ``layer_pattern``/``n_layers`` or layer sizes (at construction);
        ImportError: ``kernels='triton'`` without the triton package installed.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.layer_types = expand_layer_pattern(cfg.layer_pattern, cfg.n_layers)
        if cfg.vocab_size < 1 or cfg.d_model < 1:
            raise ValueError(
                f"model.vocab_size and model.d_model must be >= 1, got {cfg.vocab_size}, {cfg.d_model}"
            )
        if cfg.init_std <= 0:
            raise ValueError(f"model.init_std must be > 0, got {cfg.init_std}")
        self.activation_checkpointing = cfg.activation_checkpointing
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(HybridBlock(kind, cfg, i) for i, kind in enumerate(self.layer_types))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.reset_parameters()

    def tie_weights(self) -> None:
        """Make ``lm_head.weight`` the same Parameter as ``embed.weight`` when ``tie_embeddings``.

        ``Module.to_empty`` (materialising a meta-device model) replaces each module's parameters
        separately and so unties them; :meth:`reset_parameters` calls this first to restore it.
        """
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-tie (see :meth:`tie_weights`) and re-initialise every parameter as in the class docstring."""
        self.tie_weights()
        std = self.config.init_std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (RMSNorm, GatedRMSNorm, ShortConvolution)):
                m.reset_parameters()
            if isinstance(m, GatedDeltaNet):
                m.reset_decay_parameters()
            elif isinstance(m, LightningAttention):
                m.reset_parameters()
        out_std = std / math.sqrt(2 * len(self.layers))
        for block in self.layers:
            nn.init.normal_(block.mixer.o_proj.weight, mean=0.0, std=out_std)
            if isinstance(block.ffn, MoE):
                block.ffn.reset_parameters(std, out_std)
            else:
                nn.init.normal_(block.ffn.down_proj.weight, mean=0.0, std=out_std)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-normed hidden states [B, T, D] (what :meth:`forward` feeds the LM head).

        Same arguments and errors as :meth:`forward`; lets a trainer fuse the head with the loss.
        """
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"input_ids must be an integer tensor [B, T], got {input_ids.dtype} {tuple(input_ids.shape)}"
            )
        B, T = input_ids.shape
        # context parallelism (apply_context_parallel): input_ids is this rank's zigzag shard of a
        # sequence of cp.degree * T tokens and cu_seqlens holds the global document boundaries
        cp = getattr(self, "context_parallel", None)
        if cu_seqlens is not None:
            if B != 1:
                raise ValueError(
                    "cu_seqlens requires the packed layout: input_ids [1, T] with the documents end to end, "
                    f"got B={B}"
                )
            check_cu_seqlens(cu_seqlens, T * (cp.degree if cp is not None else 1))
        if position_ids is None and cp is not None:
            from lctrain.parallel.context import shard_sequence

            full = default_position_ids(B, T * cp.degree, cu_seqlens, input_ids.device)
            position_ids = shard_sequence(full, cp.degree, cp.rank)
        elif position_ids is None:
            position_ids = default_position_ids(B, T, cu_seqlens, input_ids.device)
        elif position_ids.shape != (B, T):
            raise ValueError(f"position_ids must be [B, T] = {(B, T)}, got {tuple(position_ids.shape)}")
        x = self.embed(input_ids)
        ckpt = self.activation_checkpointing and torch.is_grad_enabled()
        for block in self.layers:
            if ckpt:
                x = checkpoint(block, x, position_ids, cu_seqlens, use_reentrant=False)
            else:
                x = block(x, position_ids, cu_seqlens)
        return self.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Next-token logits.

        Args:
            input_ids: int64 (or int32) [B, T] token ids.
            position_ids: int [B, T] position of each token within its document (RoPE angle and
                short-conv mask). ``None``: derived from ``cu_seqlens`` when given, else ``0..T-1``.
                When given with ``cu_seqlens`` it must restart at 0 at every boundary.
            cu_seqlens: int32 [N + 1] document boundaries of a packed batch (B must be 1);
                attention and the Gated DeltaNet state never cross a boundary.

        Returns:
            logits [B, T, vocab_size]: fp32 for an fp32 model, the autocast dtype under autocast.

        Raises:
            ValueError: bad shapes/dtypes, ``cu_seqlens`` with B != 1 or not ending at T.
        """
        return self.lm_head(self.hidden_states(input_ids, position_ids, cu_seqlens))

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Number of parameters (a tied embedding/head matrix counted once).

        ``exclude_embedding=True`` leaves out the token-embedding table (and with it the tied
        LM head, which is the same tensor); an untied LM head stays in.
        """
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            n -= self.embed.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Model FLOPs of one training step (forward + backward) per token, for MFU.

        ``6 * N`` for the matmuls (Kaplan et al. 2020, ``C = 6 N`` per token), with ``N`` every
        parameter except the embedding lookup plus the ``vocab * D`` LM head (tied or not), plus
        the sequence mixing that parameters do not count, at 3x its forward cost:

        * softmax attention, causal, per layer: forward ``2 * 2 * H * Dh * T/2`` (QK^T and PV
          over on average T/2 keys) -> ``6 * H * Dh * T`` for training. (Non-causal accountings,
          e.g. ``12 * H * Dh * T`` in the PaLM appendix, count the masked half too.)
        * Lightning Attention, per layer: read and write the [Dh, Dh] state, ``2 * 2 * Dh^2``
          forward per head -> ``12 * H * Dh^2`` for training.
        * Gated DeltaNet, per layer: the recurrence reads, corrects and writes the [K, V] state,
          ``3 * 2 * K * V`` forward per head -> ``18 * H * K * V`` for training, independent of
          T (the chunked kernel's intra-chunk work is an implementation cost, not counted).

        Args:
            seq_len: T, tokens per sequence (or per document when packed), > 0.

        Returns:
            FLOPs per token (float).

        Raises:
            ValueError: ``seq_len < 1``.
        """
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        cfg = self.config
        n = self.num_params(exclude_embedding=True)
        if cfg.tie_embeddings:
            n += cfg.vocab_size * cfg.d_model
        for block in self.layers:  # MoE: each token runs top_k of num_experts routed experts
            if isinstance(block.ffn, MoE):
                routed = sum(p.numel() for p in block.ffn.experts.parameters())
                n -= routed * (1.0 - block.ffn.top_k / block.ffn.experts.num_experts)
        flops = 6.0 * n
        v_dim = int(cfg.gdn_head_dim * cfg.gdn_expand_v)
        for kind in self.layer_types:
            if kind == "A":
                flops += 6.0 * cfg.num_heads * cfg.head_dim * seq_len
            elif kind == "L":
                flops += 12.0 * cfg.num_heads * cfg.head_dim * cfg.head_dim
            else:
                flops += 18.0 * cfg.gdn_num_heads * cfg.gdn_head_dim * v_dim
        return flops
