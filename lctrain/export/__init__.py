"""Hugging Face export and import: lctrain models in the Qwen3-Next format (``Qwen3NextForCausalLM``).

* :mod:`lctrain.export.qwen3_next`: config and state-dict conversion both ways, safetensors
  (sharded) files, the tokenizer files; needs no transformers.
* :mod:`lctrain.export.cli`: ``launch/export.py`` and ``launch/import_hf.py``.

See ``docs/export.md``.
"""

from lctrain.export.qwen3_next import (
    check_exportable,
    from_hf_state_dict,
    hf_config,
    load_pretrained,
    model_config_from_hf,
    save_pretrained,
    to_hf_state_dict,
    write_tokenizer,
)

__all__ = [
    "check_exportable", "from_hf_state_dict", "hf_config", "load_pretrained", "model_config_from_hf",
    "save_pretrained", "to_hf_state_dict", "write_tokenizer",
]
