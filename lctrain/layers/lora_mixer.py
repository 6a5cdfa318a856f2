"""LoRA-Mixer: routed low-rank (LoRA) experts on the linear projections of a token mixer.

LoRA-Mixer (2025) replaces chosen projections of an attention / linear-attention layer by a base
linear map plus a router that picks, per token, ``top_k`` of ``E`` LoRA experts (Hu et al. 2021,
"LoRA"), some of which may be adapters trained elsewhere and loaded frozen. Everything below is
lctrain's own formulation; where the paper's details are not public (its Specialization Balance
Loss, its exact hard/soft routing) the choice is marked "lctrain's choice".

Notation for one wrapped projection (``S`` tokens, ``D_in -> D_out``, ``E`` experts, ``K = top_k``,
rank ``r``), x [S, D_in]:

* Router (bias-free Linear D_in -> E, computed in fp32 with autocast off):
  ``z = x R^T`` [S, E], ``p = softmax(z)`` [S, E] fp32.
* Hard selection: ``T(s) = topk(p_s, K)``; ``w_hard[s, e] = p[s, e] / sum_{j in T(s)} p[s, j]`` for
  ``e in T(s)``, else 0 (top-k then renormalise; for ``K = 1`` this is the one-hot of the argmax).
* Straight-through gate (lctrain's choice): ``g = sg(w_hard) + (p - sg(p))`` [S, E], ``sg`` the
  stop-gradient. Its forward value is exactly ``w_hard`` (``p - sg(p)`` is exactly 0), its
  derivative is ``dg_e / dz = dp_e / dz`` for *every* expert ``e``, so the router receives the
  gradient of the soft mixture ``sum_e p_e u_e`` (``u_e = s_e B_e A_e x``) while the output and the
  expert gradients are those of the hard top-k mixture.
* Output: ``y = W x (+ b) + sum_e g[s, e] * s_e * B_e A_e x``, only the ``K`` selected experts
  non-zero in value. ``s_e = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA, Kalajdzievski
  2023) for trainable experts; a loaded adapter keeps its own ``alpha / r_adapter``.
* Balance + specialisation terms (lctrain's choice; the paper's Specialization Balance Loss is not
  public): ``L_aux = balance_coeff * E * sum_i f_i P_i + entropy_coeff * mean_s H(p_s)`` with the
  Switch balance (:func:`lctrain.layers.routing.load_balancing_loss`: ``f_i`` the fraction of the
  ``S * K`` slots routed to ``i``, ``P_i = mean_s p[s, i]``) and the per-token routing entropy
  ``H(p_s) = -sum_e p[s, e] log p[s, e]`` in nats. ``entropy_coeff > 0`` *lowers* the per-token
  entropy (each token commits to few experts: specialisation) while the balance term spreads the
  tokens over experts; ``entropy_coeff < 0`` pushes each token towards uniform routing. The terms
  reach the router's gradient through :class:`~lctrain.layers.routing.AuxLossScaler` (scaled by
  ``aux_loss_scale``); the layer output is unchanged.

Compute (all experts at once; the straight-through gradient needs every ``u_e`` anyway): one matmul
``x [S, D_in] @ A_all^T [D_in, E*r]``, a multiply by the gate (zero outside the top-k), one matmul
``[S, E*r] @ B_all^T [E*r, D_out]``. Cost ``E * r * (D_in + D_out)`` multiply-adds per token on top
of the base, independent of ``K`` (for E = 8, r = 8 like one rank-64 LoRA). Unselected experts get
exactly zero gradient in ``A``/``B`` (their gate value is 0), so data parallelism sees a gradient for
every parameter each step.

Routed-layer protocol (as :class:`lctrain.layers.moe.MoE`): ``routing_stats``
(:class:`~lctrain.layers.routing.RoutingStats`; ``aux_loss`` accumulates
``balance_coeff * balance``, ``z_loss`` accumulates ``entropy_coeff * entropy``), ``aux_loss_scale``,
``balance_group`` (set from outside under context parallelism) and a no-op ``after_step``.

This module imports no parallel, training or run-config code.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lctrain.errors import ConfigError
from lctrain.layers.routing import AuxLossScaler, RoutingStats, load_balancing_loss, topk_route

__all__ = [
    "DEFAULT_PEFT_NAME_MAP",
    "LoRAMixerConfig",
    "LoRAMixerLinear",
    "apply_lora_mixer",
    "install_peft_adapter",
    "install_peft_adapters",
    "load_peft_adapter",
    "lora_mixer_layers",
    "map_adapter_module_name",
]

A_INITS = ("kaiming", "gaussian")


def _split_list(value: str) -> list[str]:
    return [v.strip() for v in str(value).split(",") if v.strip()]


def lora_scale(lora_alpha: float, r: int, use_rslora: bool) -> float:
    """The LoRA scale ``s``: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA (as PEFT)."""
    return float(lora_alpha) / (math.sqrt(r) if use_rslora else float(r))


# ------------------------------------------------------------------------------------------ config
@dataclass
class LoRAMixerConfig:
    """Section ``model.lora_mixer``: routed LoRA experts on mixer projections (0 experts = off).

    Keys:
        num_experts: E, experts per wrapped projection, adapters included (0 disables LoRA-Mixer).
        top_k: experts each token uses (1 <= top_k <= num_experts).
        r: LoRA rank of the trainable experts (adapters of a smaller rank are zero-padded to it).
        lora_alpha: LoRA alpha of the trainable experts; scale ``alpha / r`` (or ``/ sqrt(r)``).
        use_rslora: rank-stabilised scale ``alpha / sqrt(r)`` for the trainable experts.
        target_modules: comma list of the mixer's ``nn.Linear`` attribute names to wrap.
        layers: comma list of layer letters whose mixers get LoRA-Mixer (``"A"``; ``"A,G"`` also
            the Gated DeltaNet layers, which have ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` too).
        train_base: keep the base projection weights trainable (False freezes them).
        balance_coeff: coefficient of the Switch balance term (>= 0).
        entropy_coeff: coefficient of the mean per-token routing entropy (> 0 sharpens routing,
            < 0 flattens it, 0 off).
        adapters: comma list of PEFT LoRA adapter directories; adapter ``i`` becomes the frozen
            expert ``i`` of every wrapped projection (so ``len(adapters) <= num_experts``).
    """

    num_experts: int = 0
    top_k: int = 1
    r: int = 8
    lora_alpha: float = 16.0
    use_rslora: bool = False
    target_modules: str = "q_proj,k_proj,v_proj,o_proj"
    layers: str = "A"
    train_base: bool = True
    balance_coeff: float = 0.01
    entropy_coeff: float = 0.0
    adapters: str = ""

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0

    def target_list(self) -> list[str]:
        """``target_modules`` as a list of names."""
        return _split_list(self.target_modules)

    def layer_letters(self) -> list[str]:
        """``layers`` as a list of letters."""
        return _split_list(self.layers)

    def adapter_paths(self) -> list[str]:
        """``adapters`` as a list of directories."""
        return _split_list(self.adapters)

    def applies_to(self, letter: str) -> bool:
        """Whether mixers of layer letter ``letter`` get LoRA-Mixer (False when disabled)."""
        return self.enabled and letter in self.layer_letters()

    def validate(self, prefix: str = "model.lora_mixer") -> None:
        """Raise :class:`~lctrain.errors.ConfigError` naming the bad key and what is allowed.

        Checks only the values (no file system access: adapter directories are read by
        :func:`load_peft_adapter`, which raises FileNotFoundError).
        """
        if not isinstance(self.num_experts, int) or self.num_experts < 0:
            raise ConfigError(f"invalid {prefix}.num_experts={self.num_experts!r}: must be an integer >= 0 (0 = off)")
        adapters = self.adapter_paths()
        if self.num_experts == 0:
            if adapters:
                raise ConfigError(
                    f"{prefix}.adapters={self.adapters!r} needs {prefix}.num_experts >= {len(adapters)} "
                    f"(each adapter is one expert), got num_experts=0 (off)"
                )
            return
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"invalid {prefix}.top_k={self.top_k!r}: must be in "
                              f"[1, {prefix}.num_experts={self.num_experts}]")
        if not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"invalid {prefix}.r={self.r!r}: must be a positive integer")
        if not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0:
            raise ConfigError(f"invalid {prefix}.lora_alpha={self.lora_alpha!r}: must be a finite number > 0")
        targets = self.target_list()
        if not targets:
            raise ConfigError(f"invalid {prefix}.target_modules={self.target_modules!r}: name at least one projection, "
                              f"e.g. \"q_proj,k_proj,v_proj,o_proj\"")
        bad = [t for t in targets if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", t)]
        if bad or len(set(targets)) != len(targets):
            raise ConfigError(f"invalid {prefix}.target_modules={self.target_modules!r}: must be a comma list of "
                              f"distinct module attribute names (e.g. q_proj,k_proj,v_proj,o_proj)")
        from lctrain.layers.registry import MIXERS, describe_mixers

        letters = self.layer_letters()
        unknown = [x for x in letters if x not in MIXERS]
        if not letters or unknown:
            raise ConfigError(f"invalid {prefix}.layers={self.layers!r}: must be a comma list of layer letters; "
                              f"allowed: {describe_mixers()}")
        if self.balance_coeff < 0 or not math.isfinite(self.balance_coeff):
            raise ConfigError(f"invalid {prefix}.balance_coeff={self.balance_coeff!r}: must be a finite number >= 0 "
                              f"(0 = off)")
        if not math.isfinite(self.entropy_coeff):
            raise ConfigError(f"invalid {prefix}.entropy_coeff={self.entropy_coeff!r}: must be a finite number "
                              f"(> 0 sharpens per-token routing, < 0 flattens it, 0 = off)")
        if len(adapters) > self.num_experts:
            raise ConfigError(f"invalid {prefix}.adapters: {len(adapters)} adapters but {prefix}.num_experts="
                              f"{self.num_experts}; each adapter takes one expert slot")


# ------------------------------------------------------------------------------------------ layer
class LoRAMixerLinear(nn.Module):
    """A base ``nn.Linear`` plus ``num_experts`` routed LoRA experts (formulas: module docstring).

    Args:
        base: the wrapped ``nn.Linear`` W [D_out, D_in] (bias allowed); kept as the submodule
            ``base`` (the same object, so its Parameters are the model's).
        num_experts: E >= 1 (frozen slots included).
        top_k: K in [1, E].
        r: rank of the trainable experts.
        lora_alpha: alpha of the trainable experts.
        use_rslora: trainable experts use ``s = alpha / sqrt(r)`` instead of ``alpha / r``.
        train_base: False sets ``requires_grad=False`` on ``base.weight`` (and ``base.bias``).
        balance_coeff, entropy_coeff: coefficients of the auxiliary terms.
        num_frozen: E_f in [0, E], slots reserved for frozen experts (PEFT adapters,
            :func:`install_peft_adapter`); they are experts ``0 .. E_f - 1``, stored as buffers.
        init_A: ``"kaiming"`` (PEFT's default ``init_lora_weights=True``: each ``A_e`` from
            ``kaiming_uniform_(a=sqrt(5))`` with fan_in D_in, i.e. ``U(-1/sqrt(D_in), 1/sqrt(D_in))``)
            or ``"gaussian"`` (PEFT's ``"gaussian"``: ``N(0, 1/r)``, std ``1/r``). B is always 0.

    State (state-dict keys relative to this module; E_t = E - E_f trainable experts):
        ``base.weight`` [D_out, D_in] (``base.bias`` [D_out]) - the original Parameters;
        ``lora_A`` Parameter [E_t, r, D_in]; ``lora_B`` Parameter [E_t, D_out, r] (both absent
        when E_t = 0); ``router.weight`` Parameter [E, D_in];
        ``frozen_A`` buffer [E_f, r, D_in]; ``frozen_B`` buffer [E_f, D_out, r] (persistent,
        absent when E_f = 0; zero until an adapter is installed);
        ``expert_scale`` buffer [E] fp32, persistent: ``s_e`` per expert (frozen ones first).
        Expert ``e < E_f`` is ``frozen_*[e]``, expert ``e >= E_f`` is ``lora_*[e - E_f]``.
    ``weight`` / ``bias`` (properties) and ``in_features`` / ``out_features`` mirror the base, so
    code reading ``o_proj.weight`` (e.g. the model's init) reaches the base weight.

    ``forward(x [..., D_in]) -> [..., D_out]`` in the dtype ``base`` produces (router in fp32).
    In training mode with gradients enabled the auxiliary terms are attached through
    :class:`AuxLossScaler` and ``routing_stats`` is updated (moved to x's device if needed).

    Raises:
        TypeError: ``base`` is not an ``nn.Linear``.
        ValueError: sizes out of range, unknown ``init_A``, or an input whose last dim is not D_in.
    """

    def __init__(
        self,
        base: nn.Linear,
        num_experts: int,
        top_k: int = 1,
        r: int = 8,
        lora_alpha: float = 16.0,
        use_rslora: bool = False,
        train_base: bool = True,
        balance_coeff: float = 0.01,
        entropy_coeff: float = 0.0,
        num_frozen: int = 0,
        init_A: str = "kaiming",
    ):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRAMixerLinear wraps an nn.Linear, got {type(base).__name__}")
        if num_experts < 1 or not 1 <= top_k <= num_experts or r < 1 or not 0 <= num_frozen <= num_experts:
            raise ValueError(
                f"LoRAMixerLinear needs num_experts >= 1, 1 <= top_k <= num_experts, r >= 1 and "
                f"0 <= num_frozen <= num_experts; got num_experts={num_experts} top_k={top_k} r={r} "
                f"num_frozen={num_frozen}"
            )
        if init_A not in A_INITS:
            raise ValueError(f"init_A={init_A!r}: allowed values are {', '.join(A_INITS)}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.num_experts, self.top_k, self.r = num_experts, top_k, r
        self.lora_alpha, self.use_rslora, self.init_A = float(lora_alpha), bool(use_rslora), init_A
        self.balance_coeff, self.entropy_coeff = float(balance_coeff), float(entropy_coeff)
        self.num_frozen = num_frozen
        self.scaling = lora_scale(lora_alpha, r, use_rslora)
        dev, dt = base.weight.device, base.weight.dtype
        n_train = num_experts - num_frozen
        if n_train > 0:
            self.lora_A = nn.Parameter(torch.empty(n_train, r, self.in_features, device=dev, dtype=dt))
            self.lora_B = nn.Parameter(torch.empty(n_train, self.out_features, r, device=dev, dtype=dt))
        else:
            self.register_parameter("lora_A", None)
            self.register_parameter("lora_B", None)
        if num_frozen > 0:
            self.register_buffer("frozen_A", torch.zeros(num_frozen, r, self.in_features, device=dev, dtype=dt))
            self.register_buffer("frozen_B", torch.zeros(num_frozen, self.out_features, r, device=dev, dtype=dt))
        else:
            self.register_buffer("frozen_A", None)
            self.register_buffer("frozen_B", None)
        self.register_buffer("expert_scale", torch.full((num_experts,), self.scaling, device=dev, dtype=torch.float32))
        self.router = nn.Linear(self.in_features, num_experts, bias=False, device=dev, dtype=dt)
        self.set_train_base(train_base)
        self.routing_stats = RoutingStats.zeros(num_experts)
        self.aux_loss_scale = 1.0
        self.balance_group = None  # context parallelism: the group counting f_i of the balance term
        self.reset_parameters()

    # ---------------------------------------------------------------- base mirrors
    @property
    def weight(self) -> torch.Tensor:
        """The base weight [D_out, D_in] (the same Parameter as ``base.weight``)."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base bias [D_out] or None."""
        return self.base.bias

    def set_train_base(self, train_base: bool) -> None:
        """``requires_grad = train_base`` on the base weight and bias."""
        self.train_base = bool(train_base)
        for p in self.base.parameters():
            p.requires_grad_(self.train_base)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Trainable experts: ``A`` as ``init_A`` says, ``B = 0``, scale ``s``; router as ``nn.Linear``.

        Frozen experts (installed adapters) and their scales are left as they are; the base is not
        touched (the model initialises it). After ``to_empty`` of a meta-device model, reinstall
        the adapters (or load a checkpoint, which holds them).
        """
        if self.lora_A is not None:
            if self.init_A == "kaiming":
                bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)) with fan_in = D_in
                self.lora_A.uniform_(-bound, bound)
            else:
                self.lora_A.normal_(0.0, 1.0 / self.r)
            self.lora_B.zero_()
            self.expert_scale[self.num_frozen:] = self.scaling
        self.router.reset_parameters()

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All experts' ``(A [E, r, D_in], B [E, D_out, r])``, frozen slots first (buffers: no gradient)."""
        parts_a, parts_b = [], []
        if self.frozen_A is not None:
            ref = self.lora_A if self.lora_A is not None else self.base.weight
            parts_a.append(self.frozen_A.to(ref.dtype))
            parts_b.append(self.frozen_B.to(ref.dtype))
        if self.lora_A is not None:
            parts_a.append(self.lora_A)
            parts_b.append(self.lora_B)
        if len(parts_a) == 1:
            return parts_a[0], parts_b[0]
        return torch.cat(parts_a, 0), torch.cat(parts_b, 0)

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router of ``h [S, D_in]``: ``(logits, p, w_hard, topk_idx)``.

        ``logits`` and ``p = softmax(logits)`` fp32 [S, E]; ``w_hard`` fp32 [S, E] (renormalised
        top-k probabilities, 0 elsewhere; no gradient); ``topk_idx`` int64 [S, K] (sorted by p).
        """
        with torch.autocast(h.device.type, enabled=False):  # router in fp32
            logits = F.linear(h.float(), self.router.weight.float())
        probs = torch.softmax(logits, dim=-1)
        w_top, idx = topk_route(probs.detach(), self.top_k, norm_topk_prob=True)
        w_hard = torch.zeros_like(probs).scatter_(1, idx, w_top)
        return logits, probs, w_hard, idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"LoRAMixerLinear(in_features={self.in_features}) got x{tuple(x.shape)}")
        shape = x.shape
        h = x.reshape(-1, self.in_features)
        S, E, r = h.shape[0], self.num_experts, self.r
        y = self.base(h)
        logits, probs, w_hard, idx = self.route(h)
        gate = w_hard + (probs - probs.detach())  # straight-through: value w_hard, gradient of p
        gate = gate * self.expert_scale.float()
        A, B = self.expert_weights()
        xa = F.linear(h, A.reshape(E * r, self.in_features)).view(S, E, r)
        xa = xa * gate.to(xa.dtype).unsqueeze(-1)
        delta = F.linear(xa.reshape(S, E * r), B.permute(1, 0, 2).reshape(self.out_features, E * r))
        y = y + delta.to(y.dtype)
        if self.training and torch.is_grad_enabled():
            balance, entropy = self.aux_terms(logits, probs, idx)
            wb, we = self.balance_coeff * balance, self.entropy_coeff * entropy
            if (self.balance_coeff != 0 or self.entropy_coeff != 0) and probs.requires_grad:
                y = AuxLossScaler.apply(y, wb + we, self.aux_loss_scale)
            if self.routing_stats.load.device != h.device:
                self.routing_stats.to(h.device)
            self.routing_stats.add(idx, wb, we, None)
        return y.reshape(*shape[:-1], self.out_features)

    def aux_terms(
        self, logits: torch.Tensor, probs: torch.Tensor, topk_idx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Uncoefficiented ``(balance, entropy)`` fp32 scalars.

        ``balance = E * sum_i f_i P_i`` (:func:`load_balancing_loss` with ``balance_group``),
        ``entropy = mean_s -sum_e p[s, e] log p[s, e]`` (``log p`` as ``log_softmax(logits)``; 0 for
        an empty input).
        """
        balance = load_balancing_loss(probs, topk_idx, self.num_experts, self.balance_group)
        if probs.shape[0] == 0:
            return balance, probs.sum()
        entropy = -(probs * torch.log_softmax(logits, dim=-1)).sum(-1).mean()
        return balance, entropy

    @torch.no_grad()
    def after_step(self, stats: RoutingStats) -> None:
        """Routed-layer protocol hook; LoRA-Mixer has nothing to update after a step."""

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, num_experts={self.num_experts}, "
                f"top_k={self.top_k}, r={self.r}, scaling={self.scaling:g}, num_frozen={self.num_frozen}, "
                f"train_base={self.train_base}")


def lora_mixer_layers(model: nn.Module) -> list[tuple[str, LoRAMixerLinear]]:
    """``(name, module)`` of every :class:`LoRAMixerLinear` of ``model`` in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRAMixerLinear)]


def apply_lora_mixer(mixer: nn.Module, cfg: LoRAMixerConfig, prefix: str = "model.lora_mixer") -> nn.Module:
    """Wrap the ``cfg.target_modules`` ``nn.Linear`` submodules of one mixer with :class:`LoRAMixerLinear`, in place.

    ``mixer.<name>`` becomes a LoRAMixerLinear whose ``base`` is the original Linear object (state
    dict: ``<name>.weight`` becomes ``<name>.base.weight``, plus ``<name>.lora_A``, ``<name>.lora_B``,
    ``<name>.router.weight``, ``<name>.expert_scale`` and, with adapters, ``<name>.frozen_A`` /
    ``<name>.frozen_B``; see :class:`LoRAMixerLinear`). ``len(cfg.adapters)`` slots are reserved for
    frozen experts (:func:`install_peft_adapters` fills them). ``cfg.num_experts == 0``: the mixer
    is returned unchanged. Dotted target names (``"sub.proj"``) reach nested modules.

    Returns:
        ``mixer`` (the same object).

    Raises:
        ConfigError: a target that is missing, not an ``nn.Linear``, or already wrapped (the message
            lists the mixer's Linear submodules); an invalid config (:meth:`LoRAMixerConfig.validate`).
    """
    if not cfg.enabled:
        return mixer
    cfg.validate(prefix)
    linears = [n for n, m in mixer.named_modules() if isinstance(m, nn.Linear) and n]
    kind = type(mixer).__name__
    resolved = []
    for name in cfg.target_list():
        parent_name, _, leaf = name.rpartition(".")
        try:
            parent = mixer.get_submodule(parent_name) if parent_name else mixer
        except AttributeError:
            parent = None
        child = getattr(parent, leaf, None) if parent is not None else None
        if isinstance(child, LoRAMixerLinear):
            raise ConfigError(f"{prefix}.target_modules: {kind}.{name} is already a LoRAMixerLinear (applied twice?)")
        if child is None or not isinstance(child, nn.Linear):
            what = "has no submodule" if child is None else f"has {type(child).__name__}, not an nn.Linear, at"
            raise ConfigError(f"{prefix}.target_modules={cfg.target_modules!r}: {kind} {what} {name!r}; "
                              f"its nn.Linear submodules are {', '.join(linears) or '(none)'}")
        resolved.append((parent, leaf, child))
    n_frozen = len(cfg.adapter_paths())
    for parent, leaf, child in resolved:
        setattr(parent, leaf, LoRAMixerLinear(
            child, cfg.num_experts, cfg.top_k, cfg.r, cfg.lora_alpha, cfg.use_rslora, cfg.train_base,
            cfg.balance_coeff, cfg.entropy_coeff, num_frozen=n_frozen,
        ))
    return mixer


# ------------------------------------------------------------------------------------------ PEFT
PEFT_PREFIX = "base_model.model."

#: HF decoder (Llama / Qwen / Mistral layout) attention projections -> lctrain HybridLM mixer projections.
DEFAULT_PEFT_NAME_MAP: dict[str, str] = {
    r"(?:model\.)?layers\.(\d+)\.self_attn\.([qkvo]_proj)": r"layers.\1.mixer.\2",
}


def load_peft_adapter(path: str | Path) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Read a PEFT LoRA adapter directory: ``(adapter_config dict, {module_name: (A [r, in], B [out, r])})``.

    Files: ``adapter_config.json`` (``r``, ``lora_alpha``, ``target_modules``, ``use_rslora``, ...)
    and ``adapter_model.safetensors`` with keys ``<prefix><module>.lora_A.weight`` [r, in] and
    ``<prefix><module>.lora_B.weight`` [out, r]; ``module_name`` is ``<module>`` with PEFT's
    ``base_model.model.`` prefix removed (e.g. ``model.layers.0.self_attn.q_proj``). Tensors are
    returned as stored (dtype of the file, on CPU). The returned config always has ``r``,
    ``lora_alpha`` and ``use_rslora``, and ``scaling`` (``alpha / r`` or ``alpha / sqrt(r)``).

    Raises:
        FileNotFoundError: the directory or one of the two files is missing.
        ConfigError: not a LoRA adapter (``peft_type``), DoRA (``use_dora``), ``fan_in_fan_out``,
            non-empty ``rank_pattern`` / ``alpha_pattern``, trained biases (``bias`` not "none"),
            ``modules_to_save``, bad ``r`` / ``lora_alpha``, keys that are not ``lora_A`` /
            ``lora_B`` weights, a module with only one of A and B, or shapes that disagree with ``r``.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"PEFT adapter directory {str(path)!r} does not exist")
    cfg_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"PEFT adapter {str(path)!r} has no adapter_config.json")
    if not weights_file.is_file():
        extra = " (only adapter_model.bin found; save it with safe_serialization=True)" if (
            path / "adapter_model.bin").exists() else ""
        raise FileNotFoundError(f"PEFT adapter {str(path)!r} has no adapter_model.safetensors{extra}")
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"PEFT adapter {str(path)!r}: adapter_config.json is not valid JSON ({err})") from err
    where = f"PEFT adapter {str(path)!r}"
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise ConfigError(f"{where}: peft_type={peft_type!r}; only LORA adapters can be LoRA-Mixer experts")
    if config.get("use_dora"):
        raise ConfigError(f"{where}: use_dora=true (DoRA) is not supported; a LoRA-Mixer expert is plain LoRA B A")
    if config.get("fan_in_fan_out"):
        raise ConfigError(f"{where}: fan_in_fan_out=true (GPT-2 Conv1D layout) is not supported; "
                          f"lctrain's projections are nn.Linear [out, in]")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise ConfigError(f"{where}: non-empty {key} (per-module ranks/alphas) is not supported; "
                              f"one r and lora_alpha per adapter")
    if str(config.get("bias", "none")) != "none":
        raise ConfigError(f"{where}: bias={config.get('bias')!r} (trained biases) is not supported; allowed: none")
    if config.get("modules_to_save"):
        raise ConfigError(f"{where}: modules_to_save={config.get('modules_to_save')!r} (fully trained modules) "
                          f"cannot be an expert; allowed: empty")
    r, alpha = config.get("r"), config.get("lora_alpha", config.get("r"))
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ConfigError(f"{where}: r={r!r} in adapter_config.json must be a positive integer")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        raise ConfigError(f"{where}: lora_alpha={alpha!r} in adapter_config.json must be a number > 0")
    use_rslora = bool(config.get("use_rslora", False))
    config = dict(config, r=r, lora_alpha=float(alpha), use_rslora=use_rslora,
                  scaling=lora_scale(alpha, r, use_rslora))

    from safetensors.torch import load_file

    tensors = load_file(str(weights_file), device="cpu")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight", key)
        if m is None:
            raise ConfigError(f"{where}: unexpected tensor {key!r}; only <module>.lora_A.weight and "
                              f"<module>.lora_B.weight are supported (no DoRA magnitudes, embeddings or saved modules)")
        module = m.group(1)
        module = module.removeprefix(PEFT_PREFIX)
        parts.setdefault(module, {})[m.group(2)] = value
    if not parts:
        raise ConfigError(f"{where}: adapter_model.safetensors holds no lora_A / lora_B weights")
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, ab in parts.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise ConfigError(f"{where}: module {module!r} has {sorted(ab)} but needs both lora_A and lora_B")
        a, b = ab["lora_A"], ab["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise ConfigError(f"{where}: module {module!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                              f"expected [r, in] and [out, r] with r={r} from adapter_config.json")
        out[module] = (a, b)
    return config, out


def map_adapter_module_name(name: str, name_map: Mapping[str, str] | None = None) -> str | None:
    """The lctrain module name of adapter module ``name``, or None when no pattern matches.

    ``name_map``: ``{regex: template}``; the first regex (in dict order) that matches the whole
    name wins and the template is expanded with its groups (``re.Match.expand``: ``\\1``, ...).
    Default :data:`DEFAULT_PEFT_NAME_MAP`: ``[model.]layers.{i}.self_attn.{q,k,v,o}_proj`` ->
    ``layers.{i}.mixer.{q,k,v,o}_proj`` (block ``i`` of :class:`lctrain.models.HybridLM`).
    An exact name works as a pattern too (``re.escape`` it to be strict).
    """
    for pattern, template in (DEFAULT_PEFT_NAME_MAP if name_map is None else name_map).items():
        m = re.fullmatch(pattern, name)
        if m is not None:
            return m.expand(template)
    return None


@torch.no_grad()
def install_peft_adapter(
    model: nn.Module, path: str | Path, slot: int, name_map: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Install one PEFT adapter as the frozen expert ``slot`` of every :class:`LoRAMixerLinear` of ``model``.

    Every adapter module is mapped to an lctrain module name (:func:`map_adapter_module_name`)
    that must be a LoRAMixerLinear of ``model`` with ``num_frozen > slot``; there ``frozen_A[slot]``
    and ``frozen_B[slot]`` get the adapter's A [r_a, in] and B [out, r_a], zero-padded to the layer's
    rank when ``r_a < r`` (exact: the padded rows of A and columns of B are 0, so ``B A`` is
    unchanged), and ``expert_scale[slot]`` the adapter's ``alpha / r_a`` (``alpha / sqrt(r_a)`` with
    its ``use_rslora``). Wrapped projections the adapter does not cover get a zero expert in that
    slot (the adapter leaves them unchanged). Frozen experts are buffers: no optimizer or weight
    decay touches them, and checkpoints carry them.

    Returns:
        ``{lctrain_name: adapter_module_name}`` of the installed modules.

    Raises:
        FileNotFoundError / ConfigError: as :func:`load_peft_adapter`; ConfigError also for an
        adapter module no pattern maps ("unknown module"), a mapped name that is not a
        LoRAMixerLinear of ``model``, a slot without a frozen place, a rank above the layer's r,
        or in/out sizes that differ from the layer's.
    """
    config, modules = load_peft_adapter(path)
    where = f"PEFT adapter {str(path)!r}"
    layers = dict(lora_mixer_layers(model))
    if not layers:
        raise ConfigError(f"{where}: the model has no LoRA-Mixer projections (model.lora_mixer.num_experts=0?)")
    r_a, scale = config["r"], config["scaling"]
    targets: dict[str, tuple[str, torch.Tensor, torch.Tensor]] = {}
    for name, (a, b) in modules.items():
        mapped = map_adapter_module_name(name, name_map)
        if mapped is None:
            raise ConfigError(f"{where}: unknown module {name!r}: no name-map pattern matches it "
                              f"(patterns: {list(DEFAULT_PEFT_NAME_MAP if name_map is None else name_map)}); "
                              f"pass a name_map or drop the module")
        if mapped not in layers:
            some = ", ".join(list(layers)[:6])
            raise ConfigError(f"{where}: module {name!r} maps to {mapped!r}, which is not a LoRA-Mixer projection of "
                              f"the model (those are e.g. {some}); check model.lora_mixer.target_modules / layers")
        layer = layers[mapped]
        if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
            raise ConfigError(f"{where}: module {name!r} is {a.shape[1]} -> {b.shape[0]} but {mapped} is "
                              f"{layer.in_features} -> {layer.out_features}")
        targets[mapped] = (name, a, b)
    for lname, layer in layers.items():
        if slot >= layer.num_frozen:
            raise ConfigError(f"{where}: frozen slot {slot} but {lname} has {layer.num_frozen} frozen slots "
                              f"(one per entry of model.lora_mixer.adapters)")
        if r_a > layer.r:
            raise ConfigError(f"{where}: rank r={r_a} > model.lora_mixer.r={layer.r} of {lname}; raise "
                              f"model.lora_mixer.r to at least {r_a} (smaller adapter ranks are zero-padded)")
    for lname, layer in layers.items():
        layer.frozen_A[slot].zero_()
        layer.frozen_B[slot].zero_()
        layer.expert_scale[slot] = scale
        if lname not in targets:
            continue
        _, a, b = targets[lname]
        layer.frozen_A[slot, :r_a].copy_(a)
        layer.frozen_B[slot, :, :r_a].copy_(b)
    return {lname: targets[lname][0] for lname in targets}


def install_peft_adapters(
    model: nn.Module, paths: Sequence[str | Path] | str, name_map: Mapping[str, str] | None = None
) -> list[dict[str, str]]:
    """Install adapter ``i`` of ``paths`` (a list, or a comma string like ``model.lora_mixer.adapters``) in slot ``i``.

    Returns the per-adapter results of :func:`install_peft_adapter`; raises what it raises.
    """
    if isinstance(paths, str):
        paths = _split_list(paths)
    return [install_peft_adapter(model, p, i, name_map) for i, p in enumerate(paths)]
