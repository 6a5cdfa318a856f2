"""The BAM pipeline end to end: one process, and torchrun-style on 2 gloo ranks with expert parallelism.

A tiny hybrid (GGGA, d_model 64) on 11 documents of two domains of the built-in corpus
(Shakespeare, Bible; N = 2 experts): parent 2 steps, branches 2 steps each, every variant (BTX,
BAM full, BAM shared K/V) 4 steps.

* ``bam_summary.json`` holds per-domain losses of every model, steps and tokens (the same for
  BTX and BAM); each seed's own-domain loss equals what its trainer reported.
* The upcycled step-0 checkpoint is an ordinary trainer checkpoint: ``launch/train.py``'s
  ``load_config(recipe=<run>/recipe.yaml)`` resumes it; a run resumed from its step-2 checkpoint
  repeats the losses of the uninterrupted run, and training from the step-0 checkpoint equals a
  fresh trainer holding the same weights (the stored optimizer state is a new one).
* On 2 spawned gloo ranks with ``parallel.ep_degree=2``: the ordinary trainer continues the
  one-process step-0 checkpoint with the one-process losses, and the whole pipeline (parent and
  branches data-parallel, the upcycled model expert-parallel) reproduces every one-process
  run's losses and the per-domain losses (1e-4).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from lctrain.config import load_config
from tests.conftest import free_port

pytestmark = pytest.mark.distributed

TOL = 1e-4
DOMAINS = {"shakespeare": "author=William Shakespeare", "bible": "author~King James"}
TINY = {
    "model.vocab_size": 512, "model.d_model": 64, "model.n_layers": 4, "model.attn.num_heads": 2,
    "model.attn.num_kv_heads": 1, "model.attn.head_dim": 32, "model.gdn.num_heads": 2, "model.gdn.head_dim": 32,
    "model.kernels": "torch", "data.seq_len": 64, "data.val_fraction": 0.3, "train.global_batch_size": 8,
    "train.micro_batch_size": 2, "train.checkpoint_every": 2, "train.keep_last": 5, "train.eval_every": 0,
    "train.eval_batches": 1, "train.progress": False, "train.tensorboard": False, "optim.warmup_steps": 2,
    "upcycle.parent_steps": 2, "upcycle.branch_steps": 2, "upcycle.moe_steps": 4,
}


def bam_args(out: Path, corpus: Path, cache: Path, **extra) -> list[str]:
    branches = ", ".join(f'{{name: {n}, filter: "{f}"}}' for n, f in DOMAINS.items())
    items = {**TINY, "data.path": str(corpus), "data.cache_dir": str(cache), "train.out_dir": str(out), **extra}
    return ["recipe=bam_hybrid_gdn_3to1", *(f"{k}={v}" for k, v in items.items()), f"upcycle.branches=[{branches}]"]


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    import gzip

    builtin = Path(__file__).resolve().parents[2] / "lctrain" / "data" / "builtin" / "pd_english.jsonl.gz"
    with gzip.open(builtin, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    out = []
    for author in ("William Shakespeare", "King James Version (1611)"):
        docs = [r for r in rows if r["author"] == author and len(r["text"]) > 20000][:4]
        out += [{"title": d["title"], "author": d["author"], "text": d["text"][2000: 8000 + 1500 * i]}
                for i, d in enumerate(docs)]
    path = tmp_path_factory.mktemp("bam_dist") / "domains.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in out), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def one_process(corpus, tmp_path_factory):
    """The pipeline (stage=all, every variant) in this process: (root, summary)."""
    from lctrain.upcycle.pipeline import load_upcycle_config, run_pipeline

    root = tmp_path_factory.mktemp("bam_one") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each spawned rank
    try:
        summary = run_pipeline(load_upcycle_config(bam_args(root, corpus, root.parent / "cache")))
    finally:
        torch.set_num_threads(threads)
    return root, summary


def test_summary_has_every_model_domain_and_budget(one_process):
    root, summary = one_process
    assert json.loads((root / "bam_summary.json").read_text())["models"].keys() == summary["models"].keys()
    models = summary["models"]
    assert list(models) == ["parent", "seed_shakespeare", "seed_bible", "btx", "bam_full", "bam_shared_kv"]
    tokens_per_step = 8 * 64
    for key, rec in models.items():
        assert set(rec["val_loss"]) == set(DOMAINS) and all(0 < x < 10 for x in rec["val_loss"].values())
        steps = {"parent": 2, "seed_shakespeare": 2, "seed_bible": 2}.get(key, 4)
        assert (rec["steps"], rec["tokens"]) == (steps, steps * tokens_per_step)
    for key in ("btx", "bam_full", "bam_shared_kv"):  # the same budget after branching for BTX and BAM
        assert models[key]["total_steps"] == 2 + 2 * 2 + 4
        assert models[key]["total_tokens"] == models["btx"]["total_tokens"]
        assert set(models[key]["val_loss_at_upcycle"]) == set(DOMAINS)
    assert models["bam_full"]["num_params"] > models["bam_shared_kv"]["num_params"] > models["btx"]["num_params"]
    for name in DOMAINS:  # the per-domain evaluation reads the windows Trainer.evaluate reads
        own = _summary(root / f"branch_{name}")["final_val_loss"]
        assert abs(models[f"seed_{name}"]["val_loss"][name] - own) < 1e-5


def test_upcycled_checkpoint_trains_and_resumes_in_the_ordinary_trainer(one_process, tmp_path):
    from lctrain.parallel.data_parallel import unwrap
    from lctrain.train.trainer import Trainer, train
    from lctrain.checkpoint import load_model_weights

    root, _ = one_process
    run = root / "moe_bam_full"
    ref = _summary(run)["losses"]
    assert len(ref) == 4
    recipe = f"recipe={run / 'recipe.yaml'}"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        resumed = train(load_config([recipe, f"train.out_dir={tmp_path / 'resumed'}",
                                     f"train.resume={run / 'checkpoints' / 'step_00000002'}"]))
        fresh_cfg = load_config([recipe, f"train.out_dir={tmp_path / 'fresh'}", "train.resume=none"])
        fresh = Trainer(fresh_cfg)
        weights = load_model_weights(run / "checkpoints" / "step_00000000", fresh_cfg.model)
        unwrap(fresh.model).load_state_dict(weights)
        fresh_losses = fresh.fit()["losses"]
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(ref), rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.tensor(fresh_losses), torch.tensor(ref), rtol=0, atol=1e-6)


def _pipeline_worker(rank: int, world: int, port: int, args: list[str], train_args: list[str], out_file: str) -> None:
    """The ordinary trainer on ``train_args`` (a 1-process upcycled checkpoint), then the whole pipeline on ``args``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from lctrain.train.trainer import Trainer
    from lctrain.upcycle.pipeline import upcycle_main

    Trainer(load_config(train_args)).fit()
    code = upcycle_main(args)  # destroys the process group at the end
    Path(f"{out_file}.{rank}").write_text(str(code))


def test_pipeline_on_two_ranks_with_expert_parallel_equals_one_process(one_process, corpus, tmp_path):
    root, _ = one_process
    run = tmp_path / "run"
    args = bam_args(run, corpus, root.parent / "cache", **{"parallel.ep_degree": 2, "upcycle.variants": "[full]"})
    moe = root / "moe_bam_full"  # its step-0 checkpoint was written by one process
    train_args = [f"recipe={moe / 'recipe.yaml'}", "parallel.ep_degree=2", f"train.out_dir={tmp_path / 'ep2'}",
                  f"train.resume={moe / 'checkpoints' / 'step_00000000'}"]
    mp.start_processes(_pipeline_worker, args=(2, free_port(), args, train_args, str(tmp_path / "code")), nprocs=2,
                       start_method="spawn")
    assert [(tmp_path / f"code.{r}").read_text() for r in range(2)] == ["0", "0"]
    got, ref = _summary(tmp_path / "ep2"), _summary(moe)
    assert (got["world_size"], got["ep_degree"]) == (2, 2)
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=0, atol=TOL)
    for sub in ("parent", "branch_shakespeare", "branch_bible", "moe_bam_full"):
        got, ref = _summary(run / sub), _summary(root / sub)
        assert got["world_size"] == 2
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=0, atol=TOL)
        assert abs(got["final_val_loss"] - ref["final_val_loss"]) < TOL
    assert _summary(run / "moe_bam_full")["ep_degree"] == 2
    got = json.loads((run / "bam_summary.json").read_text())["models"]["bam_full"]["val_loss"]
    ref = json.loads((root / "bam_summary.json").read_text())["models"]["bam_full"]["val_loss"]
    assert all(abs(got[d] - ref[d]) < TOL for d in DOMAINS)
