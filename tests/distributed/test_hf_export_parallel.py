"""Hugging Face export from checkpoints written by 2 gloo ranks: FSDP (dp=2) and expert parallelism (ep=2).

Each case trains the tiny ``qwen3_next`` recipe for 2 steps on 2 spawned ranks; at the end every
rank also dumps the live parameters it trained (FSDP shards gathered with ``full_tensor()``, EP
ranks their own expert slices, concatenated here in EP-rank order): an independent copy of the
weights that never went through DCP. ``launch/export.py`` then reads the DCP checkpoint in one
process and must write exactly ``to_hf_state_dict`` of those live weights (``torch.equal`` on every
tensor, experts included), and transformers' ``Qwen3NextForCausalLM`` loaded from the export must
give the logits of the lctrain model reloaded from the checkpoint (``load_run``), relative error
<= 1e-4.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("transformers")

from tests.conftest import free_port

pytestmark = pytest.mark.distributed


def tiny_qwen_args(out: Path, corpus: Path, cache: Path, **extra) -> list[str]:
    items = {
        "model.vocab_size": 512, "model.d_model": 32, "model.n_layers": 4, "model.attn.num_heads": 2,
        "model.attn.num_kv_heads": 1, "model.attn.head_dim": 16, "model.gdn.num_heads": 2, "model.gdn.head_dim": 8,
        "model.gdn.num_value_heads": 4, "model.gdn.chunk_size": 16, "model.moe.num_experts": 4,
        "model.moe.ffn_hidden_size": 16, "model.kernels": "torch",
        "data.path": str(corpus), "data.seq_len": 64, "data.cache_dir": str(cache), "data.val_fraction": 0.1,
        "train.out_dir": str(out), "train.max_steps": 2, "train.global_batch_size": 4, "train.micro_batch_size": 2,
        "train.checkpoint_every": 2, "train.eval_every": 0, "train.eval_batches": 1, "train.progress": False,
        "train.tensorboard": False, "optim.warmup_steps": 1, "optim.lr": 1e-2,
    }
    items.update(extra)
    return ["recipe=qwen3_next"] + [f"{k}={v}" for k, v in items.items()]


def _train_and_dump(rank: int, world: int, port: int, args: list[str], dump: str) -> None:
    """Spawned gloo rank: fit, then save this rank's view of every trained parameter to ``dump.<rank>``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from torch.distributed.tensor import DTensor

    from lctrain.config import load_config
    from lctrain.parallel.data_parallel import unwrap
    from lctrain.parallel.expert import EXPERT_PARAM_ATTR
    from lctrain.train.trainer import Trainer

    trainer = Trainer(load_config(args))
    trainer.fit()
    out = {}
    for name, p in unwrap(trainer.model).named_parameters():
        t = p.full_tensor() if isinstance(p, DTensor) else p.detach()  # FSDP2: all ranks gather together
        out[name] = (t.detach().cpu().clone(), hasattr(p, EXPERT_PARAM_ATTR))
    torch.save(out, f"{dump}.{rank}")
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data_cache")


@pytest.mark.parametrize("layout", ["fsdp_dp2", "ep2"])
def test_export_from_a_two_rank_checkpoint(layout, small_corpus, cache, tmp_path):
    from transformers import Qwen3NextForCausalLM

    from lctrain.eval.run import load_run
    from lctrain.export.cli import export_main
    from lctrain.export.qwen3_next import read_hf_state_dict, to_hf_state_dict

    run = tmp_path / "run"
    extra = {"parallel.dp_impl": "fsdp"} if layout == "fsdp_dp2" else {"parallel.ep_degree": 2}
    args = tiny_qwen_args(run, small_corpus, cache, **extra)
    dump = str(tmp_path / "params")
    mp.start_processes(_train_and_dump, args=(2, free_port(), args, dump), nprocs=2, start_method="spawn")
    ranks = [torch.load(f"{dump}.{r}") for r in range(2)]
    live = {}
    for name, (t, is_expert) in ranks[0].items():
        if is_expert:  # EP rank r holds experts [r E/2, (r+1) E/2)
            live[name] = torch.cat([ranks[0][name][0], ranks[1][name][0]], 0)
            assert live[name].shape[0] == 4 and not torch.equal(ranks[0][name][0], ranks[1][name][0])
        else:
            live[name] = t
            assert torch.equal(t, ranks[1][name][0]), name  # replicated (or gathered) on both ranks
    assert any(e for _, e in ranks[0].values()) == (layout == "ep2")

    hf_dir = tmp_path / "hf"
    assert export_main([f"run={run}", f"out={hf_dir}", "dtype=fp32"]) == 0
    loaded = load_run(run, device="cpu")
    assert loaded.step == 2
    m = loaded.cfg.model
    sd = {**loaded.model.state_dict(), **live}  # live parameters + the (zero) expert_bias buffers
    expected = to_hf_state_dict(m, sd)
    got = read_hf_state_dict(hf_dir)
    assert set(got) == set(expected)
    bad = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not bad, bad[:5]

    hf = Qwen3NextForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    x = torch.tensor([loaded.tokenizer.encode("Now is the winter of our discontent made glorious summer")])
    with torch.no_grad():
        ours, theirs = loaded.model(x), hf(x).logits
    err = float((ours - theirs).abs().max() / theirs.abs().max())
    print(f"[{layout}] max relative logits error {err:.2e}")
    assert err <= 1e-4


def _cp_worker(rank: int, world: int, port: int, out_file: str) -> None:
    """Spawned gloo rank: the Qwen3-Next-shaped model on a zigzag shard vs the whole sequence."""
    import json

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from lctrain.kernels.varlen import position_ids_from_cu_seqlens
        from lctrain.layers.routing import set_aux_loss_scale
        from lctrain.models import HybridLM
        from lctrain.parallel.context import apply_context_parallel, build_context_parallel, shard_sequence
        from tests.unit.test_hf_export import qwen_cfg

        T = 64
        cu = torch.tensor([0, 5, 16, 19, 41, 64], dtype=torch.int32)  # documents crossing the zigzag chunks
        pos = position_ids_from_cu_seqlens(cu, T)
        res = {}
        for impl in ("ring", "ulysses"):
            torch.manual_seed(3)
            model = HybridLM(qwen_cfg(**{"gdn.chunk_size": 8}))
            ids = torch.randint(0, 128, (1, T), generator=torch.Generator().manual_seed(5))
            ref = model(ids, cu_seqlens=cu)
            w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7))
            (ref * w).sum().backward()
            ref_grads = [p.grad.clone() for p in model.parameters()]
            model.zero_grad(set_to_none=True)
            apply_context_parallel(model, build_context_parallel([list(range(world))], impl))
            set_aux_loss_scale(model, 1.0 / world)  # each rank's balance loss; the ranks' gradients are summed
            sh = lambda x: shard_sequence(x, world, rank, dim=1)
            out = model(sh(ids), position_ids=sh(pos), cu_seqlens=cu)
            (out * sh(w)).sum().backward()
            res[f"{impl}/logits"] = float((out - sh(ref)).norm() / sh(ref).norm())
            worst, where = 0.0, ""
            for (name, p), g_ref in zip(model.named_parameters(), ref_grads):
                g = p.grad.clone() if p.grad is not None else torch.zeros_like(g_ref)
                dist.all_reduce(g)
                err = float((g - g_ref).norm() / g_ref.norm().clamp_min(1e-30))
                worst, where = max((worst, where), (err, name))
            res[f"{impl}/grads"] = worst
            if rank == 0:
                print(f"[cp {impl}] logits {res[f'{impl}/logits']:.2e}, worst gradient {worst:.2e} ({where})")
        gathered = [None] * world
        dist.all_gather_object(gathered, res)
        if rank == 0:
            Path(out_file).write_text(json.dumps({k: max(r[k] for r in gathered) for k in res}))
    finally:
        dist.destroy_process_group()


def test_qwen3_next_options_train_under_context_parallelism(tmp_path):
    """QK-norm, partial RoPE, grouped GDN value heads and the gated shared expert under cp=2 (ring and
    Ulysses, packed documents): logits and every parameter gradient equal one process (relative L2 < 2e-5)."""
    import json

    out = tmp_path / "cp.json"
    mp.start_processes(_cp_worker, args=(2, free_port(), str(out)), nprocs=2, start_method="spawn")
    res = json.loads(out.read_text())
    print(res)
    assert set(res) == {"ring/logits", "ring/grads", "ulysses/logits", "ulysses/grads"}
    assert all(v < 2e-5 for v in res.values()), res
