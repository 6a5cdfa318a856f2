"""Shared fixtures: a small real-text corpus cut from the built-in one, and tiny-run overrides."""

from __future__ import annotations

import gzip
import json
import os
import socket
from pathlib import Path

import pytest
import torch

# Triton kernels run under the interpreter on machines without a GPU. The variable must be set
# before triton is first imported, so it is set here, ahead of every test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parent.parent
BUILTIN = REPO / "lctrain" / "data" / "builtin" / "pd_english.jsonl.gz"


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device every kernel test builds its tensors on: CUDA when present, else the CPU with
    the Triton kernels under the interpreter (set above). tests/kernels/test_device_lint.py fails
    on a kernel test that builds tensors anywhere else."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def free_port() -> int:
    """A free TCP port on the loopback interface (for gloo rendezvous in spawned tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """12 documents of the built-in corpus cut to 6-30 K characters each (jsonl)."""
    out = tmp_path_factory.mktemp("corpus") / "small.jsonl"
    with gzip.open(BUILTIN, "rt", encoding="utf-8") as f:
        docs = [json.loads(line) for _, line in zip(range(40), f)]
    rows = []
    for i, d in enumerate(docs[::3][:12]):
        n = 6000 + 2000 * i
        rows.append({"title": d["title"], "text": d["text"][:n]})
    out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return out


def set_dotted(obj, key: str, value) -> None:
    """``obj.a.b.c = value`` for ``key="a.b.c"`` (overrides on nested config dataclasses in tests)."""
    *path, name = key.split(".")
    for part in path:
        obj = getattr(obj, part)
    setattr(obj, name, value)


def tiny_overrides(out_dir: Path, corpus: Path, cache_dir: Path, **extra) -> list[str]:
    """Overrides for a seconds-long hybrid run on ``corpus`` (4 layers GGGA, d_model 64)."""
    items = {
        "model.vocab_size": 512, "model.d_model": 64, "model.n_layers": 4, "model.attn.num_heads": 2,
        "model.attn.num_kv_heads": 1, "model.attn.head_dim": 32, "model.gdn.num_heads": 2, "model.gdn.head_dim": 32,
        "model.lightning.num_heads": 2, "model.lightning.head_dim": 32,
        "data.path": str(corpus), "data.seq_len": 64, "data.cache_dir": str(cache_dir), "data.val_fraction": 0.1,
        "train.out_dir": str(out_dir), "train.max_steps": 4, "train.global_batch_size": 8,
        "train.micro_batch_size": 2, "train.checkpoint_every": 2, "train.eval_every": 2, "train.eval_batches": 1,
        "train.progress": False, "train.tensorboard": False, "optim.warmup_steps": 2, "optim.lr": 3e-3,
    }
    items.update(extra)
    return ["recipe=hybrid_gdn_3to1"] + [f"{k}={v}" for k, v in items.items()]


def fit_worker(rank: int, world: int, port: int, args: list[str], out_file: str) -> None:
    """Spawned gloo rank: run ``Trainer(load_config(args)).fit()``; rank 0 writes the summary JSON."""
    from lctrain.config import load_config
    from lctrain.train.trainer import Trainer

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    summary = Trainer(load_config(args)).fit()
    if rank == 0:
        Path(out_file).write_text(json.dumps(summary))
    torch.distributed.destroy_process_group()
