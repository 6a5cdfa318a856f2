"""The mixer registry: layer letter -> config section, module builder and FLOPs per token.

``model.layer_pattern`` is a string of letters; each names a registered token mixer. Adding a
mixer to lctrain is one file in ``lctrain/layers/`` (the module, its config dataclass with a
``validate(prefix)`` method, a builder and a FLOPs function), one config section (a field of
``ModelConfig`` named like the spec's ``section``) and one :func:`register_mixer` call (below for
the built-in ones). :class:`lctrain.models.HybridLM`, ``config.validate`` and the parallel
schemes read everything they need from here.

Builder contract: ``build(section_cfg, d_model, *, layer_idx, n_layers, norm_eps, kernels) ->
nn.Module`` whose ``forward(x [B,T,D], position_ids [B,T] | None, cu_seqlens int32 [N+1] | None)
-> [B,T,D]`` mixes tokens through :mod:`lctrain.kernels.ops` sequence ops (so context
parallelism can swap them from outside) and whose residual output projection is ``o_proj``.

Optional config hooks: ``check_context_parallel(*, cp_degree, cp_impl, ulysses_degree, seq_len,
prefix)`` raising :class:`~lctrain.errors.ConfigError` for layouts the mixer cannot run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class MixerSpec:
    """One registered token mixer.

    Attributes:
        letter: one character used in ``model.layer_pattern``.
        name: human-readable name (messages, docs).
        section: the config section (``model.<section>``) and ``ModelConfig`` attribute holding
            an instance of ``config_cls``; a model config without that attribute uses
            ``config_cls()`` defaults.
        config_cls: the section's dataclass.
        build: ``build(section_cfg, d_model, *, layer_idx, n_layers, norm_eps, kernels) -> nn.Module``.
        flops_per_token: ``f(section_cfg, seq_len) -> float``: training (fwd + bwd) FLOPs per
            token of the sequence mixing that parameter counts miss (0 for none).
    """

    letter: str
    name: str
    section: str
    config_cls: type
    build: Callable[..., nn.Module]
    flops_per_token: Callable[[Any, int], float]


MIXERS: dict[str, MixerSpec] = {}


def register_mixer(spec: MixerSpec, replace: bool = False) -> MixerSpec:
    """Add ``spec`` to the registry; returns it.

    Raises:
        ValueError: ``letter`` is not one character, or already registered (unless ``replace``).
    """
    if len(spec.letter) != 1:
        raise ValueError(f"a mixer letter is one character, got {spec.letter!r}")
    if spec.letter in MIXERS and not replace:
        raise ValueError(f"mixer letter {spec.letter!r} is already registered ({MIXERS[spec.letter].name})")
    MIXERS[spec.letter] = spec
    return spec


def unregister_mixer(letter: str) -> None:
    """Remove a registered letter (tests that register a temporary mixer)."""
    MIXERS.pop(letter, None)


def describe_mixers() -> str:
    """``"G (Gated DeltaNet), A (softmax attention), ..."`` for messages."""
    return ", ".join(f"{k} ({v.name})" for k, v in MIXERS.items())


def get_mixer(letter: str) -> MixerSpec:
    """The spec of ``letter``.

    Raises:
        ValueError: unknown letter; the message lists the registered ones.
    """
    if letter not in MIXERS:
        raise ValueError(f"unknown mixer letter {letter!r}; registered: {describe_mixers()}")
    return MIXERS[letter]


def mixer_config(model_cfg: Any, spec: MixerSpec) -> Any:
    """The section of ``spec`` in ``model_cfg`` (or the section's defaults when the model config has none)."""
    section = getattr(model_cfg, spec.section, None)
    return section if section is not None else spec.config_cls()


def _register_builtins() -> None:
    from lctrain.layers.attention import AttentionConfig, attention_flops_per_token, build_attention
    from lctrain.layers.gated_deltanet import GatedDeltaNetConfig, build_gated_deltanet, gated_deltanet_flops_per_token
    from lctrain.layers.lightning import LightningConfig, build_lightning, lightning_flops_per_token
    from lctrain.layers.moa import MoAConfig, build_moa, moa_flops_per_token
    from lctrain.layers.moba import MoBAConfig, build_moba, moba_flops_per_token
    from lctrain.layers.moh import MoHConfig, build_moh, moh_flops_per_token

    register_mixer(MixerSpec("G", "Gated DeltaNet", "gdn", GatedDeltaNetConfig, build_gated_deltanet,
                             gated_deltanet_flops_per_token))
    register_mixer(MixerSpec("A", "softmax attention", "attn", AttentionConfig, build_attention,
                             attention_flops_per_token))
    register_mixer(MixerSpec("L", "Lightning Attention", "lightning", LightningConfig, build_lightning,
                             lightning_flops_per_token))
    register_mixer(MixerSpec("M", "MoBA block-sparse attention", "moba", MoBAConfig, build_moba, moba_flops_per_token))
    register_mixer(MixerSpec("H", "mixture-of-head attention (MoH)", "moh", MoHConfig, build_moh, moh_flops_per_token))
    register_mixer(MixerSpec("E", "mixture of attention experts (MoA, soft MoA)", "moa", MoAConfig, build_moa,
                             moa_flops_per_token))


_register_builtins()
