"""Upcycling maths: the mixture-of-experts config derived from a dense seed, and the state-dict mix.

Given ``N`` dense seeds of one architecture (the branches, each trained on its own domain) the
upcycled model is built as follows (Zhang et al. 2024, "BAM! Just Like That: Simple and
Efficient Parameter Upcycling for Mixture of Experts", Sec. 3; BTX: Sukhbaatar et al. 2024):

* **FFN experts**: every block's SwiGLU becomes an :class:`~lctrain.layers.moe.MoE` with
  ``num_experts = N`` experts of the dense width; expert ``e`` is seed ``e``'s FFN::

      experts.gate_up_proj[e] = concat(gate_proj.weight.T, up_proj.weight.T, dim=1)   [D, 2F]
      experts.down_proj[e]    = down_proj.weight.T                                    [F, D]

  With ``shared_expert`` the parent's FFN is the shared expert and both the routed and the shared
  down projections are multiplied by 1/2 (lctrain's choice: the FFN then starts as the mean of
  the parent FFN and the routed mixture instead of their sum).
* **Attention experts** (variants ``full`` and ``shared_kv``): every softmax-attention layer
  (letter ``A``) becomes a soft mixture of attention experts (letter ``E``,
  :class:`~lctrain.layers.moa.MoAttention`, ``routing = soft``) whose expert ``e`` is seed
  ``e``'s attention, copied with :meth:`MoAttention.load_dense_expert`. ``full``: each expert
  its own q/k/v/(g)/o. ``shared_kv``: one K/V projection, the element-wise mean of the seeds',
  and per-expert q/(g)/o (BAM's KV-sharing variant). ``btx`` leaves ``A`` layers dense and
  averages them.
* **Everything else** (embeddings and LM head, norms, Gated DeltaNet / Lightning / other mixers,
  buffers) is the element-wise mean of the seeds (exactly the common value where all seeds agree).
* **Routers** are new: ``N(0, init_std)`` (``router_init = normal``, as BTX and BAM initialise
  them) or zeros (uniform gates). FFN routers are drawn from ``router_seed`` and attention routers
  from ``router_seed + 1``, so every variant starts with the same FFN routers.

With identical seeds, soft attention routing and renormalised top-k FFN weights (gates summing to
one over identical experts), the upcycled model computes what the seed computes.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence

import torch

from lctrain.errors import ConfigError
from lctrain.layers.ffn import default_ffn_hidden_size
from lctrain.layers.moa import MoAConfig, MoAttention
from lctrain.layers.moe import MoE, MoEConfig
from lctrain.upcycle.config import VARIANTS

__all__ = ["ARCH_IGNORED_KEYS", "architecture_differences", "check_dense_seed", "mix_state_dicts",
           "upcycled_model_config"]

# model keys that change how a model is computed but not its parameters
ARCH_IGNORED_KEYS = ("kernels", "activation_checkpointing")


def _flat(d: Mapping, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _model_dict(model_cfg) -> dict:
    return dataclasses.asdict(model_cfg) if dataclasses.is_dataclass(model_cfg) else dict(model_cfg)


def architecture_differences(a, b) -> list[str]:
    """``model.KEY (a vs b)`` for every architecture key where two model configs differ.

    Args:
        a, b: :class:`~lctrain.config.ModelConfig` instances or their ``asdict`` dicts.

    Only sections that build parameters count: the mixer sections of letters in either pattern,
    ``moe``, ``lora_mixer`` and the shared keys; ``kernels`` and ``activation_checkpointing`` are
    ignored.
    """
    da, db = _model_dict(a), _model_dict(b)
    letters = set(da.get("layer_pattern", "") + da.get("final_layers", "") + db.get("layer_pattern", "")
                  + db.get("final_layers", ""))
    from lctrain.layers.registry import MIXERS

    used = {MIXERS[x].section for x in letters if x in MIXERS}
    fa, fb = _flat(da), _flat(db)
    diffs = []
    for key in sorted(set(fa) | set(fb)):
        head = key.split(".", 1)[0]
        if head in ARCH_IGNORED_KEYS:
            continue
        if "." in key and head not in used and head not in ("moe", "lora_mixer"):
            continue  # the section of a mixer neither model uses
        if fa.get(key) != fb.get(key):
            diffs.append(f"model.{key} ({fa.get(key)!r} vs {fb.get(key)!r})")
    return diffs


def check_dense_seed(model_cfg, what: str = "the seed") -> None:
    """A seed must be dense: no MoE FFNs, no attention experts, no LoRA-Mixer.

    Raises:
        ConfigError: naming the key that makes the seed not dense.
    """
    if model_cfg.moe.num_experts > 0:
        raise ConfigError(
            f"{what} has model.moe.num_experts={model_cfg.moe.num_experts}: upcycling starts from dense seeds "
            f"(set model.moe.num_experts=0 for the parent and branches)"
        )
    letters = model_cfg.layer_pattern + model_cfg.final_layers
    if "E" in letters:
        raise ConfigError(f"{what} has mixture-of-attention-experts layers (E in '{letters}'): seeds must be dense")
    if model_cfg.lora_mixer.enabled:
        raise ConfigError(f"{what} uses model.lora_mixer: LoRA-Mixer seeds are not supported by upcycling")


def upcycled_model_config(dense, num_experts: int, variant: str, *, shared_expert: bool = False,
                          routing=None):
    """The :class:`~lctrain.config.ModelConfig` of the model upcycled from ``num_experts`` dense seeds.

    Args:
        dense: the seeds' ModelConfig (dense, see :func:`check_dense_seed`).
        num_experts: N, the number of seeds.
        variant: ``btx`` (MoE FFNs, dense averaged attention), ``full`` or ``shared_kv`` (MoE FFNs
            and every ``A`` layer a soft MoA, letter ``E``).
        shared_expert: one shared FFN expert (the parent's).
        routing: a ModelConfig whose ``moe`` section gives the router options (``top_k``,
            capped at N, ``score_func``, ``norm_topk_prob``, losses, ``capacity_factor``,
            ``expert_impl``, ``bias_update_rate``) and whose ``moa`` section gives the attention
            router losses (``aux_loss_coeff``, ``z_loss_coeff``); default: ``dense``.

    Returns:
        A new ModelConfig: ``moe`` with ``num_experts = N``, expert width = the dense FFN width,
        ``layers = all``; for BAM variants the ``A`` letters of ``layer_pattern`` /
        ``final_layers`` replaced by ``E`` and ``moa`` sized like ``attn`` (``heads_per_expert =
        attn.num_heads``, ``num_kv_heads_per_expert = attn.num_kv_heads``, same ``head_dim``,
        ``rope_theta`` and ``output_gate``).

    Raises:
        ConfigError: unknown variant, N < 2, a non-dense seed, or a BAM variant for a model
            without softmax-attention (``A``) layers.
    """
    if variant not in VARIANTS:
        raise ConfigError(f"unknown upcycling variant {variant!r}; allowed: {', '.join(VARIANTS)}")
    if num_experts < 2:
        raise ConfigError(f"upcycling needs at least 2 seeds (one expert each), got {num_experts}")
    check_dense_seed(dense)
    routing = routing if routing is not None else dense
    out = copy.deepcopy(dense)
    r = routing.moe
    out.moe = MoEConfig(
        num_experts=num_experts, top_k=min(max(1, r.top_k), num_experts), score_func=r.score_func,
        norm_topk_prob=r.norm_topk_prob, ffn_hidden_size=default_ffn_hidden_size(dense.d_model, dense.ffn_hidden_size),
        num_shared_experts=1 if shared_expert else 0, aux_loss_coeff=r.aux_loss_coeff, z_loss_coeff=r.z_loss_coeff,
        bias_update_rate=r.bias_update_rate, capacity_factor=r.capacity_factor, layers="all",
        expert_impl=r.expert_impl,
    )
    if variant == "btx":
        return out
    if "A" not in dense.layer_pattern + dense.final_layers:
        raise ConfigError(
            f"upcycle variant {variant!r} turns softmax-attention layers (A) into attention experts, but the seed "
            f"pattern '{dense.layer_pattern}' (final_layers '{dense.final_layers}') has none; use variant btx"
        )
    a = dense.attn
    out.layer_pattern = dense.layer_pattern.replace("A", "E")
    out.final_layers = dense.final_layers.replace("A", "E")
    out.moa = MoAConfig(
        num_experts=num_experts, top_k=1, routing="soft", shared_kv=variant == "shared_kv",
        heads_per_expert=a.num_heads, num_kv_heads_per_expert=a.num_kv_heads, head_dim=a.head_dim,
        rope_theta=a.rope_theta, output_gate=a.output_gate, aux_loss_coeff=routing.moa.aux_loss_coeff,
        z_loss_coeff=routing.moa.z_loss_coeff,
    )
    return out


def _mean(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Element-wise mean (fp64 accumulation, cast back); exactly the common value when all agree."""
    first = tensors[0]
    if all(torch.equal(first, t) for t in tensors[1:]):
        return first.clone()
    if not first.is_floating_point():
        raise ConfigError(f"cannot average non-float tensors that differ between seeds (dtype {first.dtype})")
    return torch.stack([t.double() for t in tensors]).mean(0).to(first.dtype)


def _seed_tensor(seeds: Sequence[Mapping[str, torch.Tensor]], names: Sequence[str], e: int, key: str,
                 shape: tuple | None = None) -> torch.Tensor:
    if key not in seeds[e]:
        raise ConfigError(
            f"seed '{names[e]}' has no parameter {key}: the seeds do not have the architecture of the upcycled model"
        )
    t = seeds[e][key]
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ConfigError(f"seed '{names[e]}': {key} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    return t


def _router_(weight: torch.Tensor, init: str, std: float, gen: torch.Generator) -> None:
    if init == "zeros":
        weight.zero_()
    else:
        weight.copy_(torch.randn(weight.shape, generator=gen, dtype=torch.float32).mul_(std).to(weight.dtype))


@torch.no_grad()
def mix_state_dicts(
    seeds: Sequence[Mapping[str, torch.Tensor]],
    moe_cfg,
    *,
    names: Sequence[str] | None = None,
    parent: Mapping[str, torch.Tensor] | None = None,
    router_init: str = "normal",
    router_seed: int = 0,
) -> dict[str, torch.Tensor]:
    """The upcycled model's state dict from the seeds' (see the module docstring for every rule).

    Args:
        seeds: N dense ``HybridLM.state_dict()`` mappings of one architecture (fp32 or any float
            dtype; the result has the upcycled model's dtypes).
        moe_cfg: the upcycled ModelConfig from :func:`upcycled_model_config` (N experts).
        names: seed names for messages (default ``seed0``, ``seed1``, ...).
        parent: the parent's dense state dict, required when ``moe_cfg.moe.num_shared_experts``
            is 1 (its FFNs become the shared experts).
        router_init: ``normal`` (``N(0, moe_cfg.init_std)``) or ``zeros``.
        router_seed: seed of the router draw.

    Returns:
        ``HybridLM(moe_cfg).state_dict()`` filled in, on CPU: FFN experts ``[N, D, 2F]`` /
        ``[N, F, D]``, routers ``[N, D]``, MoA projections as in :mod:`lctrain.layers.moa`.

    Raises:
        ConfigError: the number of seeds is not ``moe.num_experts``, a seed lacks a parameter or
            has another shape (different architectures), or a shared expert without ``parent``.
    """
    from lctrain.models import HybridLM

    N = moe_cfg.moe.num_experts
    names = list(names) if names is not None else [f"seed{i}" for i in range(len(seeds))]
    if len(seeds) != N:
        raise ConfigError(f"{len(seeds)} seeds given for an upcycled model with model.moe.num_experts={N}")
    shared = moe_cfg.moe.num_shared_experts > 0
    if shared and (moe_cfg.moe.num_shared_experts != 1 or parent is None):
        raise ConfigError("a shared expert from the parent needs the parent's weights (upcycle.parent or a trained "
                          "parent) and model.moe.num_shared_experts=1")
    for e in range(1, N):
        extra, lacking = sorted(set(seeds[e]) - set(seeds[0])), sorted(set(seeds[0]) - set(seeds[e]))
        if extra or lacking:
            raise ConfigError(
                f"seeds '{names[0]}' and '{names[e]}' have different architectures: parameters only in '{names[e]}': "
                f"{extra[:5]}, only in '{names[0]}': {lacking[:5]}"
            )
    model = HybridLM(moe_cfg)
    target = model.state_dict()
    ffn_gen = torch.Generator().manual_seed(router_seed)
    attn_gen = torch.Generator().manual_seed(router_seed + 1)
    std = moe_cfg.init_std
    down_scale = 0.5 if shared else 1.0
    handled: set[str] = set()

    for i, block in enumerate(model.layers):
        pre = f"layers.{i}."
        ffn = block.ffn
        if isinstance(ffn, MoE):
            F = ffn.hidden_size
            D = moe_cfg.d_model
            for e in range(N):
                gate = _seed_tensor(seeds, names, e, pre + "ffn.gate_proj.weight", (F, D))
                up = _seed_tensor(seeds, names, e, pre + "ffn.up_proj.weight", (F, D))
                down = _seed_tensor(seeds, names, e, pre + "ffn.down_proj.weight", (D, F))
                ffn.experts.gate_up_proj[e].copy_(torch.cat([gate.t(), up.t()], dim=1))
                ffn.experts.down_proj[e].copy_(down.t() * down_scale)
            _router_(ffn.router.weight, router_init, std, ffn_gen)
            ffn.expert_bias.zero_()
            if shared:
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    src = parent.get(pre + f"ffn.{proj}.weight")
                    dst = getattr(ffn.shared_experts, proj).weight
                    if src is None or tuple(src.shape) != tuple(dst.shape):
                        raise ConfigError(f"the parent's {pre}ffn.{proj}.weight is missing or not {tuple(dst.shape)}")
                    dst.copy_(src * (down_scale if proj == "down_proj" else 1.0))
            handled |= {k for k in target if k.startswith(pre + "ffn.")}
        mixer = block.mixer
        if isinstance(mixer, MoAttention):
            dense_keys = list(mixer.expert_weights(0))
            for e in range(N):
                sd = {k: _seed_tensor(seeds, names, e, pre + "mixer." + k) for k in dense_keys}
                try:
                    mixer.load_dense_expert(e, sd, load_kv=True)
                except ValueError as err:
                    raise ConfigError(f"seed '{names[e]}' layer {i}: {err}") from err
            if mixer.kv_shared:  # BAM shared K/V: the mean of the seeds' K/V projections
                for proj in ("k_proj", "v_proj"):
                    getattr(mixer, proj).weight.copy_(_mean([s[pre + f"mixer.{proj}.weight"] for s in seeds]))
            _router_(mixer.router.weight, router_init, std, attn_gen)
            handled |= {k for k in target if k.startswith(pre + "mixer.")}

    averaged = {}
    for key, ref in target.items():
        if key in handled:
            continue
        ts = [_seed_tensor(seeds, names, e, key, tuple(ref.shape)) for e in range(N)]
        averaged[key] = _mean(ts).to(ref.dtype)
    missing, unexpected = model.load_state_dict(averaged, strict=False)
    assert not unexpected and set(missing) <= handled, (missing, unexpected)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
