"""Export a run to Hugging Face: ``python launch/export.py run=RUN_DIR out=DIR [checkpoint=PATH] [dtype=bf16|fp32]``.

Writes a transformers ``Qwen3NextForCausalLM`` directory (``config.json``, safetensors weights,
sharded above ``max_shard_size``, and the run's SentencePiece tokenizer). Works from any lctrain
checkpoint (DDP, FSDP, expert-parallel: read consolidated in one process). A model Qwen3-Next
cannot express (Lightning / MoBA / MoH / MoA layers, LoRA-Mixer, sigmoid router or expert bias,
capacity dropping, ...) stops with one ``error:`` line naming the block and option, exit code 2.
``--help`` lists every argument; see :mod:`lctrain.export.cli` and ``docs/export.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from lctrain.export.cli import export_main

if __name__ == "__main__":
    sys.exit(export_main(sys.argv[1:]))
