"""Checkpoints: writing, verifying and pruning them, and the one reader of what is on disk.

* :mod:`lctrain.checkpoint.store`: the atomic, resharding DCP checkpoints the trainer writes and
  resumes (:func:`save_checkpoint`, :func:`load_checkpoint`), their integrity table and
  :func:`verify_checkpoint`, :func:`find_resumable_checkpoint` (``train.resume=auto``) and the
  ``train.keep_last`` pruning.
* :mod:`lctrain.checkpoint.reader`: the reader every other caller uses (evaluation, generation,
  export, import, upcycling, DeepSpeed consolidation): :func:`open_checkpoint` resolves a run or
  checkpoint path and verifies it (checksums, as resume does); :func:`read_run_config` and
  :func:`checkpoint_model_config` read the saved config; :func:`load_weights` /
  :func:`load_model_weights` load the weights into a single-device model.
* :mod:`lctrain.checkpoint.consolidate`: DeepSpeed ZeRO checkpoints -> plain weights.
"""

from lctrain.checkpoint.consolidate import consolidate_checkpoint, export_checkpoint
from lctrain.checkpoint.reader import (
    checkpoint_model_config,
    checkpoint_state,
    load_model_weights,
    load_weights,
    open_checkpoint,
    read_run_config,
    resolve_checkpoint,
    saved_config,
)
from lctrain.checkpoint.store import (
    COMPLETE_MARKER,
    TRAINER_STATE,
    CheckpointCorruptError,
    CheckpointSaveError,
    checkpoint_dir_name,
    find_latest_checkpoint,
    find_resumable_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)

__all__ = [
    "COMPLETE_MARKER", "TRAINER_STATE", "CheckpointCorruptError", "CheckpointSaveError", "checkpoint_dir_name",
    "checkpoint_model_config", "checkpoint_state", "consolidate_checkpoint", "export_checkpoint",
    "find_latest_checkpoint", "find_resumable_checkpoint", "list_checkpoints", "load_checkpoint",
    "load_model_weights", "load_weights", "open_checkpoint", "read_run_config", "resolve_checkpoint",
    "save_checkpoint", "saved_config", "verify_checkpoint",
]
