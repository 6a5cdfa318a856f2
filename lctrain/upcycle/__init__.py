"""BAM / BTX upcycling: dense seeds trained on different domains -> one mixture-of-experts model.

* :mod:`lctrain.upcycle.config`: the ``upcycle`` recipe section (imported by :mod:`lctrain.config`).
* :mod:`lctrain.upcycle.mix`: the upcycled model config and the state-dict mixing (pure tensors).
* :mod:`lctrain.upcycle.pipeline`: the stages run by ``launch/upcycle.py`` (seed weights are read with
  :mod:`lctrain.checkpoint`, step-0 checkpoints written by :mod:`lctrain.train.init_checkpoint`).

Only the config names are imported eagerly (``lctrain.config`` imports this package).
"""

from lctrain.upcycle.config import STAGES, VARIANTS, BranchConfig, UpcycleConfig, variant_dir_name

__all__ = ["STAGES", "VARIANTS", "BranchConfig", "UpcycleConfig", "variant_dir_name"]
