"""lctrain <-> Hugging Face Qwen3-Next (``Qwen3NextForCausalLM``, transformers >= 4.57), both ways.

Qwen3-Next is a pre-norm decoder whose blocks are either Gated DeltaNet (``linear_attention``,
lctrain letter ``G``) or gated softmax attention (``full_attention``, letter ``A``), each followed
by a SwiGLU MLP or a mixture of experts with one gated shared expert. Every lctrain model built
from those parts with the options below converts exactly (same logits up to float rounding);
anything else is refused with a :class:`~lctrain.errors.ConfigError` naming the block and key.

Config mapping (lctrain ``ModelConfig`` key -> ``config.json`` field):

==============================================  =====================================================
``vocab_size``, ``d_model``, ``n_layers``        ``vocab_size``, ``hidden_size``, ``num_hidden_layers``
``layer_pattern`` (+ ``final_layers``) tiled     ``layer_types`` (``G`` linear_attention, ``A`` full_attention)
``norm_eps``, ``init_std``, ``tie_embeddings``   ``rms_norm_eps``, ``initializer_range``, ``tie_word_embeddings``
``ffn_hidden_size`` (dense SwiGLU width)         ``intermediate_size``
``attn.num_heads / num_kv_heads / head_dim``     ``num_attention_heads / num_key_value_heads / head_dim``
``attn.rope_theta, attn.partial_rotary_factor``  ``rope_theta, partial_rotary_factor`` (and ``rope_parameters``)
``attn.qk_norm=true, attn.output_gate=true``     always on in Qwen3-Next (required)
``gdn.num_heads / num_value_heads``              ``linear_num_key_heads / linear_num_value_heads``
``gdn.head_dim / head_v_dim``                    ``linear_key_head_dim / linear_value_head_dim``
``gdn.conv_size``                                ``linear_conv_kernel_dim``
``moe.num_experts / top_k / norm_topk_prob``     ``num_experts / num_experts_per_tok / norm_topk_prob``
expert width, shared-expert width                ``moe_intermediate_size``, ``shared_expert_intermediate_size``
``moe.layers``                                   ``decoder_sparse_step`` + ``mlp_only_layers``
``moe.aux_loss_coeff``                           ``router_aux_loss_coef`` (training only)
==============================================  =====================================================

Weight layout (lctrain state-dict key -> Hugging Face key, ``P = model.layers.{i}``; shapes with D =
d_model, H / HV = key / value heads, K / V their dims, G = HV / H, Hq / Hkv / Dh attention heads,
E experts of width F, S the shared-expert width):

* ``layers.{i}.mixer_norm`` / ``ffn_norm`` -> ``P.input_layernorm`` / ``P.post_attention_layernorm``,
  ``norm`` -> ``model.norm``: lctrain's RMSNorm scales ``x_hat * w``, Qwen3-Next's is zero-centred
  ``x_hat * (1 + w)``, so ``w_hf = w - 1`` (also for ``q_norm`` / ``k_norm``). The Gated DeltaNet
  output norm is ``x_hat * w * silu(z)`` in both (copied as is). ``fl(w - 1) + 1 == w`` exactly for
  ``w >= 0.5`` (Sterbenz), so export then import is bit-identical there; a scale below 0.5 loses
  the bits below 2^-25 that the zero-centred form cannot hold (Qwen3-Next computes with the
  rounded scale too).
* Gated DeltaNet (``P.linear_attn``): ``in_proj_qkvz [H*(2K + 2GV), D]`` grouped per key head
  ``h`` as ``[q_h (K) | k_h (K) | v of value heads hG..hG+G-1 (GV) | z of the same (GV)]`` from
  lctrain's ``q_proj``, ``k_proj [H*K, D]``, ``v_proj``, ``g_proj [HV*V, D]``; ``in_proj_ba
  [2HV, D]`` per key head ``[b_h (G) | a_h (G)]`` from ``b_proj``, ``a_proj [HV, D]``; one depthwise
  ``conv1d.weight [2HK + HV*V, 1, conv_size]`` over the channels ``[q | k | v]`` from ``q_conv``,
  ``k_conv``, ``v_conv`` (``[C, conv_size]`` each, the same tap order); ``A_log``, ``dt_bias [HV]``;
  ``norm.weight [V]`` from ``o_norm.weight``; ``out_proj [D, HV*V]`` from ``o_proj``.
* Attention (``P.self_attn``): ``q_proj [Hq*2Dh, D]`` interleaved per head ``[q_h (Dh) | gate_h
  (Dh)]`` from ``q_proj`` and ``g_proj [Hq*Dh, D]``; ``k_proj``, ``v_proj [Hkv*Dh, D]``, ``o_proj``;
  ``q_norm``, ``k_norm [Dh]`` (``w - 1``).
* MoE (``P.mlp``): ``gate.weight [E, D]`` from ``router.weight``; per expert ``experts.{e}.gate_proj
  / up_proj [F, D]`` = the two column halves of ``experts.gate_up_proj[e] [D, 2F]`` transposed,
  ``experts.{e}.down_proj [D, F]`` = ``experts.down_proj[e] [F, D]`` transposed (transformers >= 5
  fuses these on load; import also reads its fused ``experts.gate_up_proj [E, 2F, D]`` /
  ``experts.down_proj [E, D, F]``); ``shared_expert.{gate,up,down}_proj`` from ``shared_experts``;
  ``shared_expert_gate [1, D]``. Dense blocks: ``P.mlp.{gate,up,down}_proj`` from ``ffn``.
* ``embed.weight`` -> ``model.embed_tokens.weight``, ``lm_head.weight`` -> ``lm_head.weight``
  (not written when tied). lctrain's ``expert_bias`` buffers (unused with ``bias_update_rate=0``)
  are dropped and imported as zeros.

Packed documents: lctrain's short convolutions zero the taps that reach into the previous
document and its recurrences restart at each ``cu_seqlens`` boundary; transformers' torch path of
Qwen3-Next has no notion of packing, so the two agree on unpacked batches (one document per row).

Files (:func:`save_pretrained`): ``config.json``, ``generation_config.json``, ``model.safetensors`` or
shards ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json`` above
``max_shard_size``, and the tokenizer (:func:`write_tokenizer`). Only ``torch`` and ``safetensors``
are needed; transformers is not imported.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from lctrain.errors import ConfigError

__all__ = [
    "HF_ARCHITECTURE", "HF_MODEL_TYPE", "check_exportable", "from_hf_state_dict", "hf_config", "load_pretrained",
    "model_config_from_hf", "parse_shard_size", "read_hf_state_dict", "save_pretrained", "to_hf_state_dict",
    "write_tokenizer",
]

HF_ARCHITECTURE = "Qwen3NextForCausalLM"
HF_MODEL_TYPE = "qwen3_next"
LAYER_TYPES = {"G": "linear_attention", "A": "full_attention"}
_LETTERS = {v: k for k, v in LAYER_TYPES.items()}
_LETTER_NAMES = {"L": "Lightning Attention", "M": "MoBA block-sparse attention",
                 "H": "mixture-of-head attention (MoH)", "E": "mixture of attention experts (MoA)"}


# ----------------------------------------------------------------------------------------- checks
def _layer_types(m) -> str:
    from lctrain.models.hybrid import expand_layer_pattern

    try:
        return expand_layer_pattern(m.layer_pattern, m.n_layers, m.final_layers)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def _moe_blocks(m) -> list[int]:
    from lctrain.layers.moe import moe_layer_indices

    return moe_layer_indices(m.moe.layers, m.n_layers) if m.moe.num_experts > 0 else []


def check_exportable(m) -> None:
    """Refuse a model Qwen3-Next cannot express, naming the block and the option.

    Args:
        m: a :class:`lctrain.config.ModelConfig`.

    Raises:
        ConfigError: a mixer other than ``G`` / ``A`` (Lightning, MoBA, MoH, MoA), LoRA-Mixer,
            parallel blocks, attention without QK-norm or without the output gate, an MoE with a
            sigmoid router, expert-bias balancing, capacity dropping, no shared expert or an
            ungated one.
    """
    kinds = _layer_types(m)
    for i, kind in enumerate(kinds):
        if kind not in LAYER_TYPES:
            name = _LETTER_NAMES.get(kind, kind)
            raise ConfigError(
                f"block {i} is a '{kind}' layer ({name}, model.layer_pattern={m.layer_pattern!r}"
                + (f", model.final_layers={m.final_layers!r}" if m.final_layers else "")
                + "): Qwen3-Next has only Gated DeltaNet ('G', linear_attention) and gated softmax attention "
                "('A', full_attention) layers"
            )
    lora = m.lora_mixer
    if lora.enabled and any(lora.applies_to(k) for k in set(kinds)):
        raise ConfigError(
            f"model.lora_mixer.num_experts={lora.num_experts} (LoRA-Mixer on the {lora.layers!r} layers' "
            f"{lora.target_modules}): routed LoRA experts have no Qwen3-Next equivalent (merge or drop them first)"
        )
    if m.parallel_block:
        raise ConfigError("model.parallel_block=true: Qwen3-Next blocks are sequential (x + mixer, then + mlp)")
    if "A" in kinds:
        first = kinds.index("A")
        if not m.attn.output_gate:
            raise ConfigError(
                f"block {first} (attention): model.attn.output_gate=false, but every Qwen3-Next attention layer has "
                f"the sigmoid output gate; set model.attn.output_gate=true"
            )
        if not m.attn.qk_norm:
            raise ConfigError(
                f"block {first} (attention): model.attn.qk_norm=false, but every Qwen3-Next attention layer "
                f"RMS-normalises q and k per head; set model.attn.qk_norm=true"
            )
    blocks = _moe_blocks(m)
    if blocks:
        e, b = m.moe, blocks[0]
        refusals = [
            (e.score_func != "softmax",
             (f"model.moe.score_func={e.score_func!r}: Qwen3-Next routes with a softmax over the experts "
              f"(score_func=softmax)")),
            (e.bias_update_rate > 0,
             (f"model.moe.bias_update_rate={e.bias_update_rate!r}: expert-bias (aux-loss-free) balancing changes "
              f"the selection; Qwen3-Next has no expert bias")),
            (e.capacity_factor > 0,
             (f"model.moe.capacity_factor={e.capacity_factor!r}: capacity dropping; Qwen3-Next is dropless "
              f"(capacity_factor=0)")),
            (e.num_shared_experts < 1, "model.moe.num_shared_experts=0: every Qwen3-Next MoE block has a shared expert"),
            (not e.shared_expert_gate,
             ("model.moe.shared_expert_gate=false: Qwen3-Next gates its shared expert with sigmoid(x w); set "
              "model.moe.shared_expert_gate=true")),
        ]
        for bad, msg in refusals:
            if bad:
                raise ConfigError(f"block {b} (MoE FFN): {msg}")


# ----------------------------------------------------------------------------------------- config
def _sparse_layout(m) -> tuple[int, list[int]]:
    """``(decoder_sparse_step, mlp_only_layers)`` that give exactly lctrain's MoE blocks."""
    blocks = set(_moe_blocks(m))
    if not blocks:
        return 1, []
    for step in range(1, m.n_layers + 1):
        if blocks == {i for i in range(m.n_layers) if (i + 1) % step == 0}:
            return step, []
    return 1, [i for i in range(m.n_layers) if i not in blocks]


def _expert_widths(m) -> tuple[int, int]:
    from lctrain.layers.ffn import default_ffn_hidden_size
    from lctrain.layers.moe import default_expert_hidden_size

    dense = default_ffn_hidden_size(m.d_model, m.ffn_hidden_size)
    if m.moe.num_experts == 0:
        return dense, dense
    width = default_expert_hidden_size(m.d_model, dense, m.moe.top_k, m.moe.ffn_hidden_size)
    shared = m.moe.shared_expert_hidden_size or width * m.moe.num_shared_experts
    return width, shared


def hf_config(m, *, bos_token_id: int | None = None, eos_token_id: int | None = None,
              pad_token_id: int | None = None, max_position_embeddings: int = 32768,
              dtype: torch.dtype = torch.float32) -> dict:
    """The ``config.json`` of the Qwen3-Next model equal to ``m`` (a plain dict).

    Writes ``rope_theta`` and ``partial_rotary_factor`` both at the top level (transformers 4.x)
    and in ``rope_parameters`` (5.x).

    Raises:
        ConfigError: from :func:`check_exportable`.
    """
    from lctrain.layers.ffn import default_ffn_hidden_size

    check_exportable(m)
    kinds = _layer_types(m)
    step, mlp_only = _sparse_layout(m)
    width, shared = _expert_widths(m)
    moe = m.moe.num_experts > 0 and bool(_moe_blocks(m))
    a, g = m.attn, m.gdn
    return {
        "architectures": [HF_ARCHITECTURE],
        "model_type": HF_MODEL_TYPE,
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "intermediate_size": default_ffn_hidden_size(m.d_model, m.ffn_hidden_size),
        "num_hidden_layers": m.n_layers,
        "layer_types": [LAYER_TYPES[k] for k in kinds],
        "num_attention_heads": a.num_heads,
        "num_key_value_heads": a.num_kv_heads,
        "head_dim": a.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(max_position_embeddings),
        "initializer_range": m.init_std,
        "rms_norm_eps": m.norm_eps,
        "use_cache": True,
        "tie_word_embeddings": bool(m.tie_embeddings),
        "rope_theta": float(a.rope_theta),
        "partial_rotary_factor": float(a.partial_rotary_factor),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(a.rope_theta),
                            "partial_rotary_factor": float(a.partial_rotary_factor)},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "linear_conv_kernel_dim": g.conv_size,
        "linear_key_head_dim": g.head_dim,
        "linear_value_head_dim": g.head_v_dim,
        "linear_num_key_heads": g.num_heads,
        "linear_num_value_heads": g.value_heads,
        "decoder_sparse_step": step,
        "mlp_only_layers": mlp_only,
        "num_experts": m.moe.num_experts if moe else 0,
        "num_experts_per_tok": m.moe.top_k if moe else 1,
        "moe_intermediate_size": width,
        "shared_expert_intermediate_size": shared,
        "norm_topk_prob": bool(m.moe.norm_topk_prob),
        "output_router_logits": False,
        "router_aux_loss_coef": float(m.moe.aux_loss_coeff),
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "torch_dtype": str(dtype).replace("torch.", ""),
    }


def _rope(hf: Mapping) -> tuple[float, float]:
    rp = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    if rope_type not in ("default", None):
        raise ConfigError(f"config.json rope_type={rope_type!r}: lctrain's RoPE is the default (unscaled) one only")
    theta = rp.get("rope_theta", hf.get("rope_theta", 10000.0))
    factor = rp.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.25))
    return float(theta), float(factor)


def _pattern(kinds: str) -> str:
    """The shortest ``layer_pattern`` that tiles to ``kinds``."""
    n = len(kinds)
    for p in range(1, n + 1):
        if n % p == 0 and kinds[:p] * (n // p) == kinds:
            return kinds[:p]
    return kinds


def model_config_from_hf(hf: Mapping):
    """The :class:`lctrain.config.ModelConfig` equal to a Qwen3-Next ``config.json`` dict.

    ``layer_types`` become the shortest ``layer_pattern`` that tiles to them; the MoE blocks of
    ``decoder_sparse_step`` / ``mlp_only_layers`` become ``moe.layers`` (``all``, ``every_<n>`` or
    a comma list). Training-only keys not in the HF config keep lctrain's defaults
    (``moe.z_loss_coeff``, chunk sizes, ``kernels``).

    Raises:
        ConfigError: not a Qwen3-Next config, or an option lctrain cannot express (activation
            other than silu, attention biases, scaled RoPE, unknown layer types, value heads not a
            multiple of key heads).
    """
    from lctrain.config import ModelConfig

    if hf.get("model_type") != HF_MODEL_TYPE:
        raise ConfigError(f"config.json has model_type={hf.get('model_type')!r}; lctrain imports {HF_MODEL_TYPE!r} "
                          f"({HF_ARCHITECTURE}) models")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"config.json hidden_act={hf['hidden_act']!r}: lctrain's SwiGLU and short convolutions use silu")
    if hf.get("attention_bias", False):
        raise ConfigError("config.json attention_bias=true: lctrain's attention projections have no biases")
    n = int(hf["num_hidden_layers"])
    types = hf.get("layer_types") or [
        "linear_attention" if (i + 1) % int(hf.get("full_attention_interval", 4)) else "full_attention" for i in range(n)
    ]
    bad = sorted(set(types) - set(_LETTERS))
    if bad or len(types) != n:
        raise ConfigError(f"config.json layer_types: {len(types)} entries for num_hidden_layers={n}, unknown kinds "
                          f"{bad}; lctrain maps linear_attention -> G and full_attention -> A")
    kinds = "".join(_LETTERS[t] for t in types)
    theta, factor = _rope(hf)
    m = ModelConfig()
    m.vocab_size, m.d_model, m.n_layers = int(hf["vocab_size"]), int(hf["hidden_size"]), n
    m.layer_pattern, m.final_layers = _pattern(kinds), ""
    m.tie_embeddings = bool(hf.get("tie_word_embeddings", False))
    m.norm_eps = float(hf.get("rms_norm_eps", 1e-6))
    m.init_std = float(hf.get("initializer_range", 0.02))
    m.ffn_hidden_size = int(hf["intermediate_size"])
    m.attn.num_heads, m.attn.num_kv_heads = int(hf["num_attention_heads"]), int(hf["num_key_value_heads"])
    m.attn.head_dim = int(hf.get("head_dim") or m.d_model // m.attn.num_heads)
    m.attn.rope_theta, m.attn.partial_rotary_factor = theta, factor
    m.attn.qk_norm, m.attn.output_gate = True, True
    m.gdn.num_heads, m.gdn.head_dim = int(hf["linear_num_key_heads"]), int(hf["linear_key_head_dim"])
    m.gdn.num_value_heads, m.gdn.value_head_dim = int(hf["linear_num_value_heads"]), int(hf["linear_value_head_dim"])
    m.gdn.expand_v = 1.0
    m.gdn.conv_size = int(hf.get("linear_conv_kernel_dim", 4))
    E = int(hf.get("num_experts", 0) or 0)
    step = int(hf.get("decoder_sparse_step", 1) or 1)
    mlp_only = {int(i) for i in (hf.get("mlp_only_layers") or [])}
    blocks = [i for i in range(n) if E > 0 and i not in mlp_only and (i + 1) % step == 0]
    if blocks:
        m.moe.num_experts, m.moe.top_k = E, int(hf["num_experts_per_tok"])
        m.moe.score_func, m.moe.norm_topk_prob = "softmax", bool(hf.get("norm_topk_prob", True))
        m.moe.ffn_hidden_size = int(hf["moe_intermediate_size"])
        m.moe.num_shared_experts, m.moe.shared_expert_gate = 1, True
        m.moe.shared_expert_hidden_size = int(hf["shared_expert_intermediate_size"])
        m.moe.aux_loss_coeff = float(hf.get("router_aux_loss_coef", m.moe.aux_loss_coeff))
        m.moe.bias_update_rate, m.moe.capacity_factor = 0.0, 0.0
        if blocks == list(range(n)):
            m.moe.layers = "all"
        elif not mlp_only:
            m.moe.layers = f"every_{step}"
        else:
            m.moe.layers = ",".join(str(i) for i in blocks)
    else:
        m.moe.num_experts = 0
    if "A" in kinds:
        m.attn.validate(prefix="model.attn (from config.json)")
    if "G" in kinds:
        m.gdn.validate(prefix="model.gdn (from config.json)")
    m.moe.validate(n, prefix="model.moe (from config.json)")
    return m


# ----------------------------------------------------------------------------------------- weights
def to_hf_state_dict(m, sd: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Qwen3-Next tensors (names and layout of the module docstring) from an lctrain state dict.

    Args:
        m: the :class:`~lctrain.config.ModelConfig` of ``sd``.
        sd: ``HybridLM(m).state_dict()``-shaped CPU tensors (e.g. from
            :func:`lctrain.checkpoint.load_model_weights`).
        dtype: cast the results to it (None keeps fp32); norm shifts are computed in fp32 first.

    Returns:
        New contiguous tensors keyed by Hugging Face names (no ``lm_head.weight`` when tied).

    Raises:
        ConfigError: from :func:`check_exportable`, or ``sd`` missing a tensor of ``m``.
    """
    check_exportable(m)
    kinds = _layer_types(m)
    moe = set(_moe_blocks(m))
    out: dict[str, torch.Tensor] = {}

    def get(key: str) -> torch.Tensor:
        if key not in sd:
            raise ConfigError(f"the lctrain state dict has no '{key}' (it does not match its model config)")
        return sd[key].detach().float()

    def shift(w: torch.Tensor) -> torch.Tensor:  # lctrain x_hat * w  ->  Qwen3-Next x_hat * (1 + w)
        return w - 1.0

    out["model.embed_tokens.weight"] = get("embed.weight")
    for i, kind in enumerate(kinds):
        src, P = f"layers.{i}", f"model.layers.{i}"
        out[f"{P}.input_layernorm.weight"] = shift(get(f"{src}.mixer_norm.weight"))
        out[f"{P}.post_attention_layernorm.weight"] = shift(get(f"{src}.ffn_norm.weight"))
        x = f"{src}.mixer"
        if kind == "G":
            g = m.gdn
            H, HV, K, V = g.num_heads, g.value_heads, g.head_dim, g.head_v_dim
            G = HV // H
            q, k = get(f"{x}.q_proj.weight").view(H, K, -1), get(f"{x}.k_proj.weight").view(H, K, -1)
            v, z = get(f"{x}.v_proj.weight").view(H, G * V, -1), get(f"{x}.g_proj.weight").view(H, G * V, -1)
            D = q.shape[-1]
            out[f"{P}.linear_attn.in_proj_qkvz.weight"] = torch.cat((q, k, v, z), 1).reshape(-1, D)
            b, a = get(f"{x}.b_proj.weight").view(H, G, D), get(f"{x}.a_proj.weight").view(H, G, D)
            out[f"{P}.linear_attn.in_proj_ba.weight"] = torch.cat((b, a), 1).reshape(-1, D)
            conv = torch.cat([get(f"{x}.{c}_conv.weight") for c in "qkv"], 0)
            out[f"{P}.linear_attn.conv1d.weight"] = conv.unsqueeze(1)
            out[f"{P}.linear_attn.A_log"] = get(f"{x}.A_log")
            out[f"{P}.linear_attn.dt_bias"] = get(f"{x}.dt_bias")
            out[f"{P}.linear_attn.norm.weight"] = get(f"{x}.o_norm.weight")
            out[f"{P}.linear_attn.out_proj.weight"] = get(f"{x}.o_proj.weight")
        else:
            a = m.attn
            Hq, Dh = a.num_heads, a.head_dim
            q, gate = get(f"{x}.q_proj.weight").view(Hq, Dh, -1), get(f"{x}.g_proj.weight").view(Hq, Dh, -1)
            out[f"{P}.self_attn.q_proj.weight"] = torch.cat((q, gate), 1).reshape(2 * Hq * Dh, -1)
            for name in ("k_proj", "v_proj", "o_proj"):
                out[f"{P}.self_attn.{name}.weight"] = get(f"{x}.{name}.weight")
            out[f"{P}.self_attn.q_norm.weight"] = shift(get(f"{x}.q_norm.weight"))
            out[f"{P}.self_attn.k_norm.weight"] = shift(get(f"{x}.k_norm.weight"))
        f = f"{src}.ffn"
        if i in moe:
            out[f"{P}.mlp.gate.weight"] = get(f"{f}.router.weight")
            gate_up, down = get(f"{f}.experts.gate_up_proj"), get(f"{f}.experts.down_proj")  # [E,D,2F], [E,F,D]
            F_ = down.shape[1]
            for e in range(gate_up.shape[0]):
                out[f"{P}.mlp.experts.{e}.gate_proj.weight"] = gate_up[e, :, :F_].t()
                out[f"{P}.mlp.experts.{e}.up_proj.weight"] = gate_up[e, :, F_:].t()
                out[f"{P}.mlp.experts.{e}.down_proj.weight"] = down[e].t()
            for name in ("gate_proj", "up_proj", "down_proj"):
                out[f"{P}.mlp.shared_expert.{name}.weight"] = get(f"{f}.shared_experts.{name}.weight")
            out[f"{P}.mlp.shared_expert_gate.weight"] = get(f"{f}.shared_expert_gate.weight")
        else:
            for name in ("gate_proj", "up_proj", "down_proj"):
                out[f"{P}.mlp.{name}.weight"] = get(f"{f}.{name}.weight")
    out["model.norm.weight"] = shift(get("norm.weight"))
    if not m.tie_embeddings:
        out["lm_head.weight"] = get("lm_head.weight")
    return {k: v.to(dtype or torch.float32).contiguous().clone() for k, v in out.items()}


def from_hf_state_dict(m, hf: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An lctrain state dict (``HybridLM(m).state_dict()`` keys, fp32) from Qwen3-Next tensors.

    The inverse of :func:`to_hf_state_dict`. Experts are read per expert
    (``mlp.experts.{e}.gate_proj.weight`` ...) or fused (``mlp.experts.gate_up_proj [E, 2F, D]``,
    ``mlp.experts.down_proj [E, D, F]``); multi-token-prediction tensors (``mtp.*``) are ignored.

    Raises:
        ConfigError: a tensor the model needs is missing or has the wrong shape, or tensors are
            left over that lctrain has no place for (named).
    """
    from lctrain.layers.ffn import default_ffn_hidden_size

    kinds = _layer_types(m)
    used: set[str] = set()

    def get(key: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        if key not in hf:
            raise ConfigError(f"the Hugging Face checkpoint has no '{key}' (needed by this Qwen3-Next config)")
        used.add(key)
        t = hf[key].detach().float()
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise ConfigError(f"'{key}' has shape {tuple(t.shape)}, the config implies {tuple(shape)}")
        return t

    def unshift(w: torch.Tensor) -> torch.Tensor:
        return w + 1.0

    D = m.d_model
    out: dict[str, torch.Tensor] = {"embed.weight": get("model.embed_tokens.weight", (m.vocab_size, D))}
    moe = set(_moe_blocks(m))
    width, shared = _expert_widths(m)
    for i, kind in enumerate(kinds):
        dst, P = f"layers.{i}", f"model.layers.{i}"
        out[f"{dst}.mixer_norm.weight"] = unshift(get(f"{P}.input_layernorm.weight", (D,)))
        out[f"{dst}.ffn_norm.weight"] = unshift(get(f"{P}.post_attention_layernorm.weight", (D,)))
        x = f"{dst}.mixer"
        if kind == "G":
            g = m.gdn
            H, HV, K, V = g.num_heads, g.value_heads, g.head_dim, g.head_v_dim
            G = HV // H
            qkvz = get(f"{P}.linear_attn.in_proj_qkvz.weight", (H * (2 * K + 2 * G * V), D)).view(H, -1, D)
            q, k, v, z = torch.split(qkvz, [K, K, G * V, G * V], dim=1)
            out[f"{x}.q_proj.weight"], out[f"{x}.k_proj.weight"] = q.reshape(H * K, D), k.reshape(H * K, D)
            out[f"{x}.v_proj.weight"], out[f"{x}.g_proj.weight"] = v.reshape(HV * V, D), z.reshape(HV * V, D)
            b, a = torch.split(get(f"{P}.linear_attn.in_proj_ba.weight", (2 * HV, D)).view(H, 2 * G, D), [G, G], 1)
            out[f"{x}.b_proj.weight"], out[f"{x}.a_proj.weight"] = b.reshape(HV, D), a.reshape(HV, D)
            conv = get(f"{P}.linear_attn.conv1d.weight", (2 * H * K + HV * V, 1, g.conv_size))[:, 0]
            out[f"{x}.q_conv.weight"], out[f"{x}.k_conv.weight"], out[f"{x}.v_conv.weight"] = torch.split(
                conv, [H * K, H * K, HV * V], 0)
            out[f"{x}.A_log"] = get(f"{P}.linear_attn.A_log", (HV,))
            out[f"{x}.dt_bias"] = get(f"{P}.linear_attn.dt_bias", (HV,))
            out[f"{x}.o_norm.weight"] = get(f"{P}.linear_attn.norm.weight", (V,))
            out[f"{x}.o_proj.weight"] = get(f"{P}.linear_attn.out_proj.weight", (D, HV * V))
        else:
            a = m.attn
            Hq, Hkv, Dh = a.num_heads, a.num_kv_heads, a.head_dim
            qg = get(f"{P}.self_attn.q_proj.weight", (2 * Hq * Dh, D)).view(Hq, 2, Dh, D)
            out[f"{x}.q_proj.weight"], out[f"{x}.g_proj.weight"] = qg[:, 0].reshape(-1, D), qg[:, 1].reshape(-1, D)
            out[f"{x}.k_proj.weight"] = get(f"{P}.self_attn.k_proj.weight", (Hkv * Dh, D))
            out[f"{x}.v_proj.weight"] = get(f"{P}.self_attn.v_proj.weight", (Hkv * Dh, D))
            out[f"{x}.o_proj.weight"] = get(f"{P}.self_attn.o_proj.weight", (D, Hq * Dh))
            out[f"{x}.q_norm.weight"] = unshift(get(f"{P}.self_attn.q_norm.weight", (Dh,)))
            out[f"{x}.k_norm.weight"] = unshift(get(f"{P}.self_attn.k_norm.weight", (Dh,)))
        f = f"{dst}.ffn"
        if i in moe:
            E = m.moe.num_experts
            out[f"{f}.router.weight"] = get(f"{P}.mlp.gate.weight", (E, D))
            if f"{P}.mlp.experts.gate_up_proj" in hf:  # transformers >= 5 in-memory layout
                gu = get(f"{P}.mlp.experts.gate_up_proj", (E, 2 * width, D))
                out[f"{f}.experts.gate_up_proj"] = gu.transpose(1, 2).contiguous()
                out[f"{f}.experts.down_proj"] = get(f"{P}.mlp.experts.down_proj", (E, D, width)).transpose(1, 2)
            else:
                gate = [get(f"{P}.mlp.experts.{e}.gate_proj.weight", (width, D)) for e in range(E)]
                up = [get(f"{P}.mlp.experts.{e}.up_proj.weight", (width, D)) for e in range(E)]
                down = [get(f"{P}.mlp.experts.{e}.down_proj.weight", (D, width)) for e in range(E)]
                out[f"{f}.experts.gate_up_proj"] = torch.stack(
                    [torch.cat((gt.t(), ut.t()), 1) for gt, ut in zip(gate, up)])
                out[f"{f}.experts.down_proj"] = torch.stack([dn.t() for dn in down])
            for name, shape in (("gate_proj", (shared, D)), ("up_proj", (shared, D)), ("down_proj", (D, shared))):
                out[f"{f}.shared_experts.{name}.weight"] = get(f"{P}.mlp.shared_expert.{name}.weight", shape)
            out[f"{f}.shared_expert_gate.weight"] = get(f"{P}.mlp.shared_expert_gate.weight", (1, D))
            out[f"{f}.expert_bias"] = torch.zeros(E)
        else:
            Fd = default_ffn_hidden_size(D, m.ffn_hidden_size)
            for name, shape in (("gate_proj", (Fd, D)), ("up_proj", (Fd, D)), ("down_proj", (D, Fd))):
                out[f"{f}.{name}.weight"] = get(f"{P}.mlp.{name}.weight", shape)
    out["norm.weight"] = unshift(get("model.norm.weight", (D,)))
    if m.tie_embeddings:
        out["lm_head.weight"] = out["embed.weight"]
        used.add("lm_head.weight")
    else:
        out["lm_head.weight"] = get("lm_head.weight", (m.vocab_size, D))
    left = sorted(k for k in hf if k not in used and not k.startswith("mtp."))
    if left:
        raise ConfigError(f"the Hugging Face checkpoint has {len(left)} tensors this Qwen3-Next config does not use, "
                          f"e.g. {left[:5]}")
    return {k: v.contiguous() for k, v in out.items()}


# ----------------------------------------------------------------------------------------- files
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)


def parse_shard_size(size: int | str) -> int:
    """Bytes of ``size``: an int, or ``"500MB"``, ``"5GB"``, ``"2GiB"`` (decimal units, ``i`` binary).

    Raises:
        ConfigError: an unparsable or non-positive size.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    else:
        match = _SIZE.match(str(size))
        if not match:
            raise ConfigError(f"invalid max_shard_size={size!r}: use bytes or a size like 500MB, 5GB, 2GiB")
        unit = (match.group(2) or "B").upper()
        scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                 "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
        n = int(float(match.group(1)) * scale)
    if n < 1:
        raise ConfigError(f"invalid max_shard_size={size!r}: must be positive")
    return n


def _write_safetensors(out: Path, tensors: dict[str, torch.Tensor], max_shard_size: int) -> list[str]:
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    for old in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        old.unlink()  # a previous export with another shard count
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names, weight_map = [], {}
    for j, shard in enumerate(shards):
        name = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        names.append(name)
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names + ["model.safetensors.index.json"]


def read_hf_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face model directory (``model.safetensors`` or its sharded index).

    Raises:
        ConfigError: no safetensors weights in ``path`` (``pytorch_model.bin`` is not read).
    """
    from safetensors.torch import load_file

    p = Path(path)
    index = p / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (p / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ConfigError(f"{p} has no model.safetensors or model.safetensors.index.json (lctrain reads safetensors "
                          f"weights only; re-save the model with save_pretrained(safe_serialization=True))")
    out: dict[str, torch.Tensor] = {}
    for name in files:
        out.update(load_file(str(p / name)))
    return out


def _sp_pieces(model_path: Path) -> list[tuple[str, float, int]]:
    """``(piece, score, type)`` of every id of a SentencePiece model (type: 1 normal, 2 unknown,
    3 control, 4 user-defined, 5 unused, 6 byte)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    out = []
    for i in range(sp.get_piece_size()):
        kind = (2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 5 if sp.is_unused(i)
                else 6 if sp.is_byte(i) else 1)
        out.append((sp.id_to_piece(i), sp.get_score(i), kind))
    return out


def _check_sp_options(model_path: Path) -> dict:
    """The normaliser / dummy-prefix options of a SentencePiece model.

    Read from its protobuf when ``protobuf`` is installed; otherwise probed by encoding (the model
    type then cannot be read and is assumed BPE).
    """
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError:  # protobuf missing: probe the behaviour instead
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(model_path))
        text = "a  b\tc"
        pieces = sp.encode(text, out_type=str)
        return {"model_type": 2, "normalizer": "identity" if sp.decode(sp.encode(text)) == text else "unknown",
                "add_dummy_prefix": bool(pieces) and pieces[0].startswith("\u2581"),
                "remove_extra_whitespaces": "".join(pieces).count("\u2581") < 2, "byte_fallback": True,
                "treat_whitespace_as_suffix": False}
    proto = pb.ModelProto()
    proto.ParseFromString(model_path.read_bytes())
    ns, ts = proto.normalizer_spec, proto.trainer_spec
    return {"model_type": ts.model_type, "normalizer": ns.name, "add_dummy_prefix": ns.add_dummy_prefix,
            "remove_extra_whitespaces": ns.remove_extra_whitespaces, "byte_fallback": ts.byte_fallback,
            "treat_whitespace_as_suffix": ts.treat_whitespace_as_suffix}


def write_tokenizer(out_dir: str | Path, sp_model: str | Path, model_max_length: int = 32768) -> list[str]:
    """Write a SentencePiece BPE tokenizer in the files transformers loads with ``AutoTokenizer``.

    Files: ``tokenizer.model`` (the SentencePiece model itself, what lctrain's import reads back),
    ``tokenizer.json`` (the same BPE for the ``tokenizers`` library: vocabulary in id order,
    merges ordered by the merged piece's SentencePiece score, which is the order SentencePiece's
    BPE applies them in; byte fallback; spaces become ``▁`` and split pieces, no dummy prefix),
    ``tokenizer_config.json`` (``PreTrainedTokenizerFast``, no BOS/EOS added on encode, as
    lctrain encodes) and ``special_tokens_map.json``.

    Raises:
        ConfigError: a SentencePiece model lctrain did not make the way this conversion assumes:
            not BPE, a normaliser other than ``identity``, a dummy prefix, whitespace collapsing or
            suffix whitespace (their ``tokenizers`` equivalents are not written).
    """
    sp_model = Path(sp_model)
    out = Path(out_dir)
    opts = _check_sp_options(sp_model)
    if opts["model_type"] != 2 or opts["normalizer"] != "identity" or opts["add_dummy_prefix"] \
            or opts["remove_extra_whitespaces"] or opts["treat_whitespace_as_suffix"]:
        raise ConfigError(
            f"tokenizer {sp_model}: only lctrain-style SentencePiece BPE models (model_type=bpe, "
            f"normalization_rule_name=identity, add_dummy_prefix=false, remove_extra_whitespaces=false) convert to "
            f"tokenizer.json; got {opts}. Pass tokenizer=none to export without it"
        )
    pieces = _sp_pieces(sp_model)
    vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
    mergeable = {p for p, _, kind in pieces if kind in (1, 4)}
    ranked = sorted(((-score, i, p) for i, (p, score, kind) in enumerate(pieces) if kind == 1 and len(p) > 1))
    merges = []
    for _, _, p in ranked:
        for cut in range(1, len(p)):
            left, right = p[:cut], p[cut:]
            if left in mergeable and right in mergeable:
                merges.append([left, right])
    special = {i: p for i, (p, _, kind) in enumerate(pieces) if kind in (2, 3)}
    added = [{"id": i, "content": p, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for i, p in special.items()]
    added += [{"id": i, "content": p, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
               "special": False} for i, (p, _, kind) in enumerate(pieces) if kind == 4]
    unk = next((p for p, _, kind in pieces if kind == 2), None)
    metaspace = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "never", "split": True}
    tok = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": metaspace, "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": bool(opts["byte_fallback"]),
                  "ignore_merges": False, "vocab": vocab, "merges": merges},
    }
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(sp_model, out / "tokenizer.model")
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False) + "\n", encoding="utf-8")
    names = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": unk}
    named = {k: v for k, v in names.items() if v in vocab}
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", **named, "pad_token": None, "add_bos_token": False,
           "add_eos_token": False, "clean_up_tokenization_spaces": False, "model_max_length": int(model_max_length),
           "added_tokens_decoder": {str(a["id"]): {k: a[k] for k in ("content", "lstrip", "normalized", "rstrip",
                                                                    "single_word", "special")} for a in added}}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(named, indent=2) + "\n")
    return ["tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def save_pretrained(out_dir: str | Path, m, sd: Mapping[str, torch.Tensor], *, dtype: torch.dtype = torch.float32,
                    tokenizer: str | Path | None = None, max_shard_size: int | str = "5GB",
                    max_position_embeddings: int = 32768) -> list[str]:
    """Write ``sd`` (an lctrain state dict of model config ``m``) as a transformers Qwen3-Next directory.

    Args:
        out_dir: created if needed; files of a previous export there are replaced.
        m: :class:`~lctrain.config.ModelConfig`.
        sd: lctrain state dict (CPU tensors).
        dtype: ``torch.float32`` or ``torch.bfloat16`` for the weights (``torch_dtype`` in config.json).
        tokenizer: a SentencePiece ``.model`` to convert (:func:`write_tokenizer`), or None.
        max_shard_size: bytes or ``"5GB"``-style; above it weights are split into shards with an index.
        max_position_embeddings: written to ``config.json`` (the context length engines assume).

    Returns:
        The names of the files written.

    Raises:
        ConfigError: :func:`check_exportable`, a bad ``max_shard_size`` or tokenizer.
    """
    out = Path(out_dir)
    ids: dict[str, int | None] = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if tokenizer is not None:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
        ids = {"bos_token_id": sp.bos_id() if sp.bos_id() >= 0 else None,
               "eos_token_id": sp.eos_id() if sp.eos_id() >= 0 else None,
               "pad_token_id": sp.pad_id() if sp.pad_id() >= 0 else None}
        if sp.get_piece_size() > m.vocab_size:
            raise ConfigError(f"tokenizer {tokenizer} has {sp.get_piece_size()} ids, more than model.vocab_size="
                              f"{m.vocab_size}")
    config = hf_config(m, max_position_embeddings=max_position_embeddings, dtype=dtype, **ids)
    tensors = to_hf_state_dict(m, sd, dtype=dtype)
    limit = parse_shard_size(max_shard_size)
    out.mkdir(parents=True, exist_ok=True)
    files = _write_safetensors(out, tensors, limit)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {k: v for k, v in ids.items() if v is not None}
    (out / "generation_config.json").write_text(json.dumps({**gen, "do_sample": False}, indent=2) + "\n")
    files += ["config.json", "generation_config.json"]
    if tokenizer is not None:
        files += write_tokenizer(out, tokenizer, model_max_length=max_position_embeddings)
    return files


def load_pretrained(path: str | Path):
    """Read a Qwen3-Next directory: ``(model_config, lctrain_state_dict, sentencepiece_path | None, hf_config)``.

    ``sentencepiece_path`` is ``path/tokenizer.model`` when it is a SentencePiece model (what
    :func:`write_tokenizer` writes; lctrain's tokenizer), else None.

    Raises:
        ConfigError: no ``config.json``, an inexpressible config (:func:`model_config_from_hf`) or
            weights that do not fit it (:func:`from_hf_state_dict`).
    """
    p = Path(path)
    if not (p / "config.json").is_file():
        raise ConfigError(f"{p} is not a Hugging Face model directory: it has no config.json")
    hf = json.loads((p / "config.json").read_text())
    m = model_config_from_hf(hf)
    sd = from_hf_state_dict(m, read_hf_state_dict(p))
    sp_path = p / "tokenizer.model"
    tok = None
    if sp_path.is_file():
        try:
            import sentencepiece as spm

            spm.SentencePieceProcessor(model_file=str(sp_path))
            tok = sp_path
        except (RuntimeError, OSError):  # e.g. a tiktoken / byte-level BPE file of another tokenizer
            tok = None
    return m, sd, tok, hf
