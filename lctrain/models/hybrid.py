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
import torch.nn.functional as F
from torch import nn

from lctrain.kernels.cross_entropy import linear_cross_entropy
from lctrain.kernels.varlen import check_cu_seqlens
from lctrain.layers.ffn import SwiGLU, default_ffn_hidden_size
from lctrain.layers.lora_mixer import apply_lora_mixer, install_peft_adapters
from lctrain.layers.moe import MoE, moe_layer_indices
from lctrain.layers.norm import RMSNorm
from lctrain.layers.registry import MIXERS, describe_mixers, get_mixer, mixer_config
from lctrain.layers.rope import default_position_ids


def expand_layer_pattern(layer_pattern: str, n_layers: int, final_layers: str = "") -> str:
    """Tile ``layer_pattern`` to ``n_layers`` letters (``'GGGA'``, 8 -> ``'GGGAGGGA'``), then let
    ``final_layers`` replace the last letters (``'GM'``, 4, ``'A'`` -> ``'GMGA'``).

    Raises:
        ValueError: empty pattern, a letter that is not registered
            (:mod:`lctrain.layers.registry`), ``n_layers`` not a positive multiple of the
            pattern length, or more ``final_layers`` than layers.
    """
    if not layer_pattern:
        raise ValueError(f"model.layer_pattern is empty; use the letters {describe_mixers()}")
    bad = sorted(set(layer_pattern) - set(MIXERS))
    if bad:
        raise ValueError(f"model.layer_pattern={layer_pattern!r} has unknown letters {bad}; allowed: {describe_mixers()}")
    if n_layers < 1 or n_layers % len(layer_pattern):
        suggestion = len(layer_pattern) * max(1, round(n_layers / len(layer_pattern)))
        raise ValueError(
            f"model.n_layers={n_layers} must be a positive multiple of len(model.layer_pattern)="
            f"{len(layer_pattern)} ('{layer_pattern}'); e.g. n_layers={suggestion}"
        )
    bad = sorted(set(final_layers) - set(MIXERS))
    if bad or len(final_layers) > n_layers:
        raise ValueError(
            f"model.final_layers={final_layers!r}: at most n_layers={n_layers} letters of {describe_mixers()}"
        )
    tiled = layer_pattern * (n_layers // len(layer_pattern))
    return tiled[: n_layers - len(final_layers)] + final_layers


class HybridBlock(nn.Module):
    """One pre-norm residual block: a token mixer (registry letter ``kind``) then a SwiGLU FFN.

    Submodules: ``mixer_norm``, ``mixer`` (built by the registry entry of ``kind`` from the model
    config's section for it; ``layer_idx`` and ``n_layers`` are passed to the builder, e.g. for
    the Lightning decay slopes), ``ffn_norm``, ``ffn`` (:class:`SwiGLU`, or
    :class:`lctrain.layers.moe.MoE` in the blocks chosen by ``model.moe.layers`` when
    ``model.moe.num_experts > 0``).

    ``forward(x [B,T,D], position_ids [B,T] int, cu_seqlens int32 [N+1] | None) -> [B,T,D]``:
    ``x + mixer(mixer_norm(x)); + ffn(ffn_norm(.))`` in sequence, or with ``model.parallel_block``
    ``x + mixer(mixer_norm(x)) + ffn(ffn_norm(x))`` (both branches read the block input).
    """

    def __init__(self, kind: str, cfg, layer_idx: int = 0):
        super().__init__()
        self.kind = kind
        self.parallel_block = bool(getattr(cfg, "parallel_block", False))
        d = cfg.d_model
        spec = get_mixer(kind)
        self.mixer_norm = RMSNorm(d, cfg.norm_eps)
        self.mixer: nn.Module = spec.build(
            mixer_config(cfg, spec), d, layer_idx=layer_idx, n_layers=cfg.n_layers, norm_eps=cfg.norm_eps,
            kernels=cfg.kernels,
        )
        self.mixer.is_token_mixer = True  # context parallelism checks that it has a swappable sequence op
        lora = getattr(cfg, "lora_mixer", None)
        if lora is not None and lora.applies_to(kind):  # routed LoRA experts on the mixer's projections
            apply_lora_mixer(self.mixer, lora)
        self.ffn_norm = RMSNorm(d, cfg.norm_eps)
        dense_hidden = default_ffn_hidden_size(d, cfg.ffn_hidden_size)
        if cfg.moe.num_experts > 0 and layer_idx in moe_layer_indices(cfg.moe.layers, cfg.n_layers):
            self.ffn: nn.Module = MoE(d, cfg.moe, dense_hidden)  # model.moe.layers picks the blocks
        else:
            self.ffn = SwiGLU(d, dense_hidden)

    def forward(
        self, x: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.parallel_block:
            return x + self.mixer(self.mixer_norm(x), position_ids, cu_seqlens) + self.ffn(self.ffn_norm(x))
        x = x + self.mixer(self.mixer_norm(x), position_ids, cu_seqlens)
        return x + self.ffn(self.ffn_norm(x))

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


class HybridLM(nn.Module):
    """Hybrid linear / softmax-attention causal language model, written for one device.

    Args:
        cfg: :class:`lctrain.config.ModelConfig` (its ``layer_pattern`` letters pick registered
            mixers, each built from its config section; see :mod:`lctrain.layers.registry`).

    Submodules: ``embed`` (nn.Embedding [vocab, D]), ``layers`` (ModuleList of
    :class:`HybridBlock`, kinds in :attr:`layer_types`), ``norm`` (final RMSNorm), ``lm_head``
    (Linear D -> vocab; its weight *is* ``embed.weight`` when ``tie_embeddings``).

    Init (:meth:`reset_parameters`; call it again after ``to_empty`` on a meta-device model):
    every Linear and the embedding ``N(0, init_std)``; the output projection of each residual
    branch (``mixer.o_proj``, ``ffn.down_proj``) ``N(0, init_std / sqrt(2 * n_layers))``
    (GPT-2, Radford et al. 2019, Sec. 2.3); every other lctrain module with its own
    ``reset_parameters()`` (norm scales 1, short convolutions ``U(+-1/sqrt(conv_size))``, Gated
    DeltaNet ``A_log``/``dt_bias`` as in :meth:`GatedDeltaNet.reset_decay_parameters`, Lightning
    slopes) calls it, in module order.

    Parallelism is applied from outside by ``parallelize()`` of the parallel package (expert
    sharding, context parallelism, activation checkpointing, data parallelism). Under context
    parallelism ``sequence_shards`` is the context-parallel degree: the model then receives one
    shard of each sequence, with the true ``position_ids`` and the global ``cu_seqlens``.

    Raises:
        ValueError: bad ``layer_pattern``/``n_layers`` or layer sizes (at construction);
        ImportError: ``kernels='triton'`` without the triton package installed.
    """

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.layer_types = expand_layer_pattern(cfg.layer_pattern, cfg.n_layers, getattr(cfg, "final_layers", ""))
        if cfg.vocab_size < 1 or cfg.d_model < 1:
            raise ValueError(
                f"model.vocab_size and model.d_model must be >= 1, got {cfg.vocab_size}, {cfg.d_model}"
            )
        if cfg.init_std <= 0:
            raise ValueError(f"model.init_std must be > 0, got {cfg.init_std}")
        self.sequence_shards = 1
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(HybridBlock(kind, cfg, i) for i, kind in enumerate(self.layer_types))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.reset_parameters()
        lora = getattr(cfg, "lora_mixer", None)
        if lora is not None and lora.enabled and lora.adapter_paths():  # frozen PEFT experts (model.lora_mixer.adapters)
            install_peft_adapters(self, lora.adapter_paths())

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
            elif m is not self and not isinstance(m, MoE) and type(m).__module__.startswith("lctrain."):
                reset = getattr(m, "reset_parameters", None)
                if callable(reset):
                    reset()
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
        if cu_seqlens is not None:  # under context parallelism: global boundaries of a sequence of shards * T
            check_cu_seqlens(cu_seqlens, T * self.sequence_shards, B)
        if position_ids is None:
            if self.sequence_shards > 1:
                raise ValueError(
                    f"the model holds one of {self.sequence_shards} context-parallel shards of each sequence: pass "
                    f"the shard's true position_ids (shard_batch of the context-parallel package makes them)"
                )
            position_ids = default_position_ids(B, T, cu_seqlens, input_ids.device)
        elif position_ids.shape != (B, T):
            raise ValueError(f"position_ids must be [B, T] = {(B, T)}, got {tuple(position_ids.shape)}")
        x = self.embed(input_ids)
        for block in self.layers:
            x = block(x, position_ids, cu_seqlens)
        return self.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        ignore_index: int = -100,
    ) -> torch.Tensor:
        """Next-token logits, or with ``labels`` the summed next-token cross entropy.

        Args:
            input_ids: int64 (or int32) [B, T] token ids.
            position_ids: int [B, T] position of each token within its document (RoPE angle and
                short-conv mask). ``None``: derived from ``cu_seqlens`` when given, else ``0..T-1``
                (required under context parallelism).
                When given with ``cu_seqlens`` it must restart at 0 at every boundary.
            cu_seqlens: int32 [N + 1] document boundaries of a packed batch (B must be 1);
                attention and the recurrent states never cross a boundary.

            labels: int [B, T] target id of each position, or ``ignore_index`` (not counted). With
                labels the model returns the loss instead of the logits, so that wrappers whose
                hooks run around ``forward`` (DDP, FSDP, DeepSpeed) see the whole computation;
                with ``model.loss_chunk_size > 0`` it never forms the whole logit matrix
                (:func:`lctrain.kernels.cross_entropy.linear_cross_entropy`).

        Returns:
            logits [B, T, vocab_size]: fp32 for an fp32 model, the autocast dtype under autocast;
            with ``labels``: fp32 scalar, the sum of the cross entropy over the labelled positions.

        Raises:
            ValueError: bad shapes/dtypes, ``cu_seqlens`` with B != 1 or not ending at T, ``labels``
                not [B, T].
        """
        hidden = self.hidden_states(input_ids, position_ids, cu_seqlens)
        if labels is None:
            return self.lm_head(hidden)
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels must be [B, T] = {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
        return self.loss_sum(hidden, labels, ignore_index)

    def loss_sum(self, hidden: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Summed cross entropy (fp32 scalar) of ``lm_head(hidden)`` [B, T, D] against ``labels`` [B, T].

        ``model.loss_chunk_size > 0``: chunked (:mod:`lctrain.kernels.cross_entropy`), the matmuls in
        the autocast dtype when autocast is on (as ``lm_head`` would run), else in the weight's dtype.
        0: whole logits and ``F.cross_entropy`` on their fp32 copy.
        """
        chunk = self.config.loss_chunk_size
        if chunk <= 0:
            logits = self.lm_head(hidden)
            return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=ignore_index,
                                   reduction="sum")
        weight = self.lm_head.weight
        dev = hidden.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
        with torch.autocast(dev, enabled=False):
            return linear_cross_entropy(hidden.flatten(0, 1).to(dtype), weight.to(dtype), labels.flatten(),
                                        ignore_index=ignore_index, chunk_size=chunk)

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
        parameter except the embedding lookup plus the ``vocab * D`` LM head (tied or not), MoE
        layers counting ``top_k / num_experts`` of their routed experts, plus each mixer's
        sequence mixing that parameters do not count (the ``flops_per_token`` function of its
        registry entry: e.g. ``6 H Dh T`` for causal softmax attention, ``18 H K V`` for Gated
        DeltaNet, ``12 H Dh^2`` for Lightning Attention).

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
        for kind in self.layer_types:
            spec = get_mixer(kind)
            flops += spec.flops_per_token(mixer_config(cfg, spec), seq_len)
        return flops
