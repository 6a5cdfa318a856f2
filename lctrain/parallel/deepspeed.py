"""DeepSpeed ZeRO as a data-parallel backend (``parallel.dp_impl=deepspeed``).

The engine's configuration is generated from lctrain's own config by :func:`deepspeed_config`;
there is no second, hand-written DeepSpeed JSON. What maps to what:

* ``train.global_batch_size`` -> ``train_batch_size``;
* ``train.micro_batch_size`` -> ``train_micro_batch_size_per_gpu`` (lctrain packs these
  sequences into one ``[1, mbs * seq_len]`` row; DeepSpeed only counts samples with it);
* ``global / (micro * dp)`` -> ``gradient_accumulation_steps``;
* ``optim.grad_clip`` -> ``gradient_clipping``;
* ``parallel.zero_stage`` -> ``zero_optimization.stage`` (1, 2, 3);
* ``parallel.offload_optimizer`` / ``offload_params`` -> ``zero_optimization.offload_optimizer`` /
  ``offload_param`` with ``device=cpu`` (parameters: stage 3 only);
* ``parallel.zero_reduce_bucket_size`` -> ``reduce_bucket_size``; ``zero_allgather_bucket_size``
  -> ``allgather_bucket_size`` (stages 1-2); ``zero_prefetch_bucket_size`` ->
  ``stage3_prefetch_bucket_size``; ``zero_param_persistence_threshold`` ->
  ``stage3_param_persistence_threshold``.

Optimizer and schedule: the engine is given lctrain's own ``torch.optim.AdamW``
(:func:`lctrain.train.optim.build_optimizer`: the same two weight-decay groups, betas, eps,
``foreach`` on CPU / ``fused`` on CUDA) as a client optimizer, so no DeepSpeed op is compiled
and the update is the one DDP and FSDP make. The LR schedule stays lctrain's ``LambdaLR`` on
that optimizer (DeepSpeed's ZeRO wrappers keep its parameter-group dicts, so the schedule's
``lr`` reaches the partitioned step); no DeepSpeed scheduler is configured.

Gradient accumulation has one owner: **lctrain**. The trainer decides the micro-steps
(``global / (micro * dp)`` of them) and normalises the loss itself (``sum(CE) / global_tokens *
dp``, :meth:`DataParallel.scale_loss`); the engine is told which micro-step ends the
accumulation (:meth:`DeepSpeedDataParallel.no_sync` calls
``engine.set_gradient_accumulation_boundary``), ``engine.backward(loss, scale_wrt_gas=False)``
adds no ``1 / gradient_accumulation_steps`` of its own, and ``engine.step()`` runs once per
optimizer step. DeepSpeed averages gradients over the ``dp`` ranks as DDP does, so the update
equals DDP's (tested to 1e-4 on the per-step losses). ``gradient_accumulation_steps`` is still
set to the true count, so DeepSpeed's sample counters and ``train_batch_size`` check agree with
``train.global_batch_size``.

Precision: parameters, gradients and optimizer states stay fp32 (DeepSpeed's ``bf16`` /
``fp16`` modes are off); bf16 comes from the trainer's autocast around the forward, as with DDP.

Checkpoints: ``engine.save_checkpoint`` / ``load_checkpoint`` write and read DeepSpeed's own
files in ``<step dir>/deepspeed/`` (tag :data:`DS_TAG`) inside lctrain's atomic checkpoint
directory (temporary name, ``COMPLETE`` marker with ``"engine": "deepspeed"``, rename,
``keep_last``), next to the sampler, scheduler and per-rank RNG files lctrain writes for every
backend, so ``train.resume=auto`` continues exactly. A ZeRO checkpoint is partitioned per
``dp`` rank: it resumes at the same ``dp`` only;
:func:`lctrain.checkpoint.consolidate_checkpoint` (DeepSpeed's
``get_fp32_state_dict_from_zero_checkpoint``) turns any stage's checkpoint into one plain
``HybridLM.state_dict()`` for export and upcycling, and the checkpoint reader
(:mod:`lctrain.checkpoint`) does that by itself when a DeepSpeed checkpoint is loaded into a
plain module without an optimizer (evaluation).

Refused at start-up (``lctrain.config.validate``): ``parallel.ep_degree > 1`` (ZeRO would
treat each rank's expert shard as a replica: use ``parallel.dp_impl=ddp``) and
``parallel.cp_degree > 1``.

CPU: DeepSpeed's accelerator is chosen when ``deepspeed`` is first imported; this module sets
``DS_ACCELERATOR=cpu`` (unless already set) before importing it when there is no CUDA device,
and the process group is lctrain's gloo group. Installing with ``DS_BUILD_OPS=0`` builds no op,
and the one op DeepSpeed's CPU backend would JIT-compile at start-up (a shared-memory all-reduce
for tensor-parallel inference, unused by ZeRO training) is skipped (:func:`import_deepspeed`).
Without a launcher, the engine runs on a one-rank process group (one GPU with offload).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lctrain.errors import ConfigError
from lctrain.parallel.data_parallel import DataParallel

DS_SUBDIR = "deepspeed"  # DeepSpeed's checkpoint directory inside an lctrain step_XXXXXXXX directory
DS_TAG = "zero"  # DeepSpeed's tag (sub-subdirectory) for the one checkpoint a step directory holds
_NEVER = 2**31 - 1  # steps_per_print: DeepSpeed's own progress lines are off (lctrain logs every step)


def import_deepspeed(device_type: str = "cpu"):
    """Import ``deepspeed`` with the accelerator that matches ``device_type``; returns the module.

    On CPU (``device_type != "cuda"``), ``DS_ACCELERATOR`` is set to ``cpu`` before the first
    import unless the environment already names one. DeepSpeed's INFO logging (its config dump
    and progress lines) is lowered to WARNING unless ``LCTRAIN_DEEPSPEED_VERBOSE=1``.

    Raises:
        ConfigError: DeepSpeed is not installed, or it was imported earlier with an accelerator
            that does not match ``device_type`` (e.g. ``cuda`` in a CPU-only process).
    """
    if device_type != "cuda":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read once, at DeepSpeed's first import
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
    except ImportError as e:
        raise ConfigError(
            f"parallel.dp_impl=deepspeed needs DeepSpeed ({e}); install it without compiling ops: "
            f"DS_BUILD_OPS=0 pip install deepspeed (or pip install -e '.[deepspeed]')"
        ) from e
    name = get_accelerator().device_name()
    if device_type != "cuda" and name != "cpu":
        raise ConfigError(
            f"DeepSpeed runs with accelerator {name!r} but this process trains on {device_type}: deepspeed was imported "
            f"before lctrain could set DS_ACCELERATOR=cpu, or DS_ACCELERATOR={os.environ.get('DS_ACCELERATOR')!r} "
            f"is set; unset it (or set DS_ACCELERATOR=cpu)"
        )
    if name == "cpu":
        # DeepSpeed's CPU communication backend JIT-compiles a shared-memory all-reduce op (C++, ninja) when its
        # process-group wrapper is created; that op only serves inference_all_reduce (tensor-parallel inference),
        # never ZeRO training, so lctrain skips it: nothing is compiled and no C++ compiler is needed on CPU.
        import importlib

        ds_comm_torch = importlib.import_module("deepspeed.comm.torch")  # not `import ... as`: comm binds `torch`
        if hasattr(ds_comm_torch, "build_shm_op"):
            ds_comm_torch.build_shm_op = lambda: None
    if os.environ.get("LCTRAIN_DEEPSPEED_VERBOSE", "0") != "1":
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
    return deepspeed


def grad_accum_steps(cfg, dp_size: int) -> int:
    """Micro-steps per optimizer step, ``train.global_batch_size / (train.micro_batch_size * dp_size)``.

    Raises:
        ConfigError: the global batch is not a multiple of ``micro_batch_size * dp_size``.
    """
    t = cfg.train
    if dp_size < 1 or t.global_batch_size % (t.micro_batch_size * dp_size):
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} must be a multiple of train.micro_batch_size="
            f"{t.micro_batch_size} x data-parallel degree {dp_size} = {t.micro_batch_size * dp_size}"
        )
    return t.global_batch_size // (t.micro_batch_size * dp_size)


def deepspeed_config(cfg, dp_size: int, device_type: str = "cpu") -> dict[str, Any]:
    """The DeepSpeed config dict of a run (see the module docstring for the key mapping).

    Args:
        cfg: the :class:`~lctrain.config.RunConfig` (``train.*`` batch sizes, ``optim.grad_clip``,
            ``parallel.zero_*`` / ``offload_*``).
        dp_size: data-parallel degree (ranks DeepSpeed averages gradients over).
        device_type: ``cuda`` pins offloaded CPU memory; ``cpu`` does not.

    Returns:
        A JSON-serialisable dict for ``deepspeed.initialize(config=...)`` with
        ``train_batch_size == train_micro_batch_size_per_gpu * gradient_accumulation_steps * dp_size
        == train.global_batch_size``.

    Raises:
        ConfigError: batch sizes that do not divide (:func:`grad_accum_steps`), or a ZeRO key
            combination DeepSpeed would refuse (parameter offload below stage 3).
    """
    t, p, o = cfg.train, cfg.parallel, cfg.optim
    accum = grad_accum_steps(cfg, dp_size)
    if p.zero_stage not in (1, 2, 3):
        raise ConfigError(f"parallel.zero_stage={p.zero_stage}: allowed values are 1, 2, 3")
    if p.offload_params and p.zero_stage != 3:
        raise ConfigError(f"parallel.offload_params=true needs parallel.zero_stage=3 (now {p.zero_stage})")
    pin = device_type == "cuda"
    zero: dict[str, Any] = {
        "stage": int(p.zero_stage),
        "contiguous_gradients": True,
        "reduce_bucket_size": int(p.zero_reduce_bucket_size),
    }
    if p.zero_stage < 3:
        zero["allgather_bucket_size"] = int(p.zero_allgather_bucket_size)
    else:
        zero["stage3_prefetch_bucket_size"] = int(p.zero_prefetch_bucket_size)
        zero["stage3_param_persistence_threshold"] = int(p.zero_param_persistence_threshold)
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if p.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    return {
        "train_batch_size": int(t.global_batch_size),
        "train_micro_batch_size_per_gpu": int(t.micro_batch_size),
        "gradient_accumulation_steps": int(accum),
        "gradient_clipping": float(o.grad_clip),
        "zero_optimization": zero,
        # lctrain's torch AdamW runs the offloaded step too (DeepSpeedCPUAdam would need a compiled op)
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "steps_per_print": _NEVER,
        "wall_clock_breakdown": False,
    }


def _ensure_process_group(device: torch.device) -> None:
    """A one-rank process group when none exists (a one-process DeepSpeed run, e.g. one GPU with offload).

    DeepSpeed also insists on ``LOCAL_RANK`` in the environment (torchrun sets it); without one,
    this rank's device index is used (0 on CPU).
    """
    os.environ.setdefault("LOCAL_RANK", str(device.index or 0))
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)


class DeepSpeedDataParallel(DataParallel):
    """A DeepSpeed ZeRO engine behind the :class:`~lctrain.parallel.data_parallel.DataParallel` interface.

    Life cycle: :meth:`wrap` keeps the module (parameters still whole, so the trainer builds its
    AdamW over them); :meth:`attach_optimizer` calls ``deepspeed.initialize`` with that module and
    optimizer (ZeRO partitions the optimizer states, gradients and, at stage 3, the parameters)
    and returns the engine, which the trainer then calls for every forward. Gradient
    accumulation: see the module docstring.

    Args:
        cfg: the :class:`~lctrain.config.RunConfig` the engine config is generated from.
        device: this rank's device.
        loss_scale: the averaging degree (``dp``) used by :meth:`scale_loss`.
    """

    checkpoint_engine = "deepspeed"

    def __init__(self, cfg, device: torch.device, loss_scale: float):
        super().__init__(loss_scale)
        self.cfg = cfg
        self.device = device
        self.module: nn.Module | None = None
        self.engine = None
        self.config: dict[str, Any] | None = None

    def wrap(self, model: nn.Module) -> nn.Module:
        self.module = model
        self.model = model
        return model

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> nn.Module:
        """Build the engine from the wrapped module and ``optimizer``; returns the engine.

        Raises:
            ConfigError: DeepSpeed missing or on the wrong accelerator (:func:`import_deepspeed`),
                or batch sizes that do not divide.
        """
        if self.module is None:
            raise RuntimeError("DeepSpeedDataParallel.attach_optimizer called before wrap()")
        deepspeed = import_deepspeed(self.device.type)
        _ensure_process_group(self.device)
        self.config = deepspeed_config(self.cfg, dist.get_world_size(), self.device.type)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module="deepspeed")
            engine, _, _, _ = deepspeed.initialize(
                model=self.module, optimizer=optimizer, config=self.config, dist_init_required=False
            )
        self.engine = engine
        self.model = engine
        return engine

    def no_sync(self, enabled: bool):
        """Mark the micro-step: ``enabled`` (an accumulation micro-step) is not the boundary, the last one is.

        ZeRO-1 reduces gradients at the boundary only; ZeRO-2/3 reduce-scatter every micro-step
        into their partitions (the partitioned accumulation DeepSpeed needs), which is why this
        is not a plain "skip communication" switch.
        """
        engine = self.engine

        @contextlib.contextmanager
        def _mark():
            engine.set_gradient_accumulation_boundary(not enabled)
            yield

        return _mark()

    def backward(self, loss: torch.Tensor) -> None:
        """``engine.backward(loss, scale_wrt_gas=False)``: ``loss`` is already lctrain's normalised loss."""
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self, optimizer: torch.optim.Optimizer, max_norm: float) -> float:
        """``engine.step()`` at the accumulation boundary (clipping by ``gradient_clipping``, AdamW, zero grads).

        ``max_norm`` must equal ``optim.grad_clip`` (it is in the engine config already).

        Returns:
            The global gradient norm before clipping (``engine.get_global_grad_norm()``).
        """
        if not math.isclose(float(max_norm), float(self.config["gradient_clipping"])):
            raise ValueError(f"max_norm={max_norm} differs from the engine's gradient_clipping="
                             f"{self.config['gradient_clipping']} (optim.grad_clip)")
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return float("nan")
        return float(norm.item() if torch.is_tensor(norm) else norm)

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        """Drop a non-finite step's gradients: ``engine.step()`` sees the non-finite norm and skips the update.

        ZeRO's step treats an invalid gradient norm as an overflow: it clears the partitioned
        gradients and leaves parameters and optimizer states untouched. If the gradients were
        finite after all (a non-finite loss whose gradients are finite), the step would be taken:
        that is reported with a warning.
        """
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.step()
        if self.engine.was_step_applied():
            warnings.warn("non-finite loss with finite gradients: DeepSpeed applied the optimizer step", stacklevel=2)

    def clip_grad_norm_(self, max_norm: float) -> float:
        raise NotImplementedError("DeepSpeed clips inside engine.step(); use DeepSpeedDataParallel.step()")

    def state_dict(self, optimizer):
        raise NotImplementedError("DeepSpeed checkpoints with its own files: save_engine_state / load_engine_state")

    def load_state_dict(self, state, optimizer):
        raise NotImplementedError("DeepSpeed checkpoints with its own files: save_engine_state / load_engine_state")

    def save_engine_state(self, directory) -> None:
        """``engine.save_checkpoint(directory/deepspeed, tag=DS_TAG)``: model, ZeRO partitions, engine counters.

        Collective: every rank writes its own optimizer partition.
        """
        self.engine.save_checkpoint(str(Path(directory) / DS_SUBDIR), tag=DS_TAG, client_state={}, save_latest=True)

    def load_engine_state(self, directory) -> None:
        """``engine.load_checkpoint`` of :meth:`save_engine_state`'s files, optimizer states included.

        Raises:
            ConfigError: the checkpoint was written by a different number of ranks (ZeRO
                partitions are per rank; convert with :func:`lctrain.checkpoint.consolidate_checkpoint`).
            RuntimeError: DeepSpeed found no checkpoint under ``directory/deepspeed``.
        """
        directory = Path(directory)
        saved_world = _saved_world_size(directory)
        world = dist.get_world_size()
        if saved_world is not None and saved_world != world:
            raise ConfigError(
                f"DeepSpeed checkpoint {directory} was written by {saved_world} ranks but this run has {world}; ZeRO "
                f"partitions resume at the same data-parallel size only. Launch {saved_world} ranks, or export the "
                f"weights with lctrain.checkpoint.consolidate_checkpoint and start a new run from them"
            )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module="deepspeed")
            load_path, _ = self.engine.load_checkpoint(
                str(directory / DS_SUBDIR), tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=False,
                load_module_strict=True,
            )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint (tag {DS_TAG!r}) under {directory / DS_SUBDIR}")


def _saved_world_size(directory: Path) -> int | None:
    try:
        return int(json.loads((directory / "COMPLETE").read_text())["world_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
