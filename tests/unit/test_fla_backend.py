"""``model.kernels=fla``: lctrain's arguments mapped onto fla-core's chunk kernels.

fla's Triton kernels do not run on CPU (not even under ``TRITON_INTERPRET=1``), so the mapping is
checked through fla's own PyTorch reference functions (``fla.ops.gated_delta_rule.naive``,
``fla.ops.simple_gla.naive``) behind fla's chunk signatures: per-sequence calls for
``cu_seqlens`` (fla's documented varlen contract), value head ``j`` reading q/k head
``j // (HV / H)`` (fla's ``i_h // (HV // H)``), states ``[N, HV, K, V]`` (``state_v_first=False``).
Outputs, final states and gradients are compared with lctrain's torch chunk path, also through
context-parallel state passing and a whole model.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lctrain.kernels import fla_backend
from lctrain.kernels.gated_delta_rule import chunk_gated_delta_rule
from lctrain.kernels.lightning_attn import chunk_lightning_attn
from lctrain.kernels.ops import GatedDeltaRuleOp, LightningAttnOp
from lctrain.kernels.varlen import attach_host_bounds
from tests.conftest import REPO

naive_gdn = pytest.importorskip("fla.ops.gated_delta_rule.naive").naive_recurrent_gated_delta_rule
naive_sgla = pytest.importorskip("fla.ops.simple_gla.naive").naive_recurrent_simple_gla


def _per_sequence(fn, tensors, initial_state, cu_seqlens, cu_seqlens_cpu, output_final_state):
    """fla's varlen contract from a reference without ``cu_seqlens``: one call per sequence."""
    if cu_seqlens is None:
        return fn(*tensors, initial_state=initial_state, output_final_state=output_final_state)
    assert cu_seqlens.dtype == torch.long and cu_seqlens_cpu.tolist() == cu_seqlens.tolist()
    outs, states = [], []
    for n, (s, e) in enumerate(itertools.pairwise(cu_seqlens_cpu.tolist())):
        h0 = None if initial_state is None else initial_state[n:n + 1]
        o, h = fn(*(t[:, s:e] for t in tensors), initial_state=h0, output_final_state=True)
        outs.append(o)
        states.append(h)
    return torch.cat(outs, 1), (torch.cat(states) if output_final_state else None)


def ref_chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                               state_v_first=False, chunk_size=64, cu_seqlens=None, cu_seqlens_cpu=None):
    """fla's ``chunk_gated_delta_rule`` signature on fla's ``naive_recurrent_gated_delta_rule``."""
    assert not state_v_first and chunk_size in (16, 32, 64)
    G = v.shape[2] // q.shape[2]
    q, k = q.repeat_interleave(G, 2), k.repeat_interleave(G, 2)  # fla: value head j reads q/k head j // G

    def one(q, k, v, g, beta, initial_state, output_final_state):  # note the reference's (beta, g) order
        return naive_gdn(q, k, v, beta, g, scale=scale, initial_state=initial_state,
                         output_final_state=output_final_state)

    return _per_sequence(one, (q, k, v, g, beta), initial_state, cu_seqlens, cu_seqlens_cpu, output_final_state)


def ref_chunk_simple_gla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None, output_final_state=False,
                         state_v_first=False, cu_seqlens=None, cu_seqlens_cpu=None):
    """fla's ``chunk_simple_gla`` (data-independent ``g_gamma``) on ``naive_recurrent_simple_gla``."""
    assert g is None and g_gamma is not None and not state_v_first
    gt = g_gamma.expand(*q.shape[:3])

    def one(q, k, v, gt, initial_state, output_final_state):
        return naive_sgla(q, k, v, gt, scale=scale, initial_state=initial_state, output_final_state=output_final_state)

    return _per_sequence(one, (q, k, v, gt), initial_state, cu_seqlens, cu_seqlens_cpu, output_final_state)


@pytest.fixture
def fla_reference():
    fla_backend.set_fla_kernels(ref_chunk_gated_delta_rule, ref_chunk_simple_gla)
    yield
    fla_backend.set_fla_kernels(None)


def _rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _compare(fn, ref, inputs, tol=2e-5):
    """Outputs, final states and gradients of every input of ``fn`` vs ``ref`` (same random cotangents)."""
    xa = [x.clone().requires_grad_() for x in inputs]
    xb = [x.clone().requires_grad_() for x in inputs]
    oa, sa = fn(*xa)
    ob, sb = ref(*xb)
    assert oa.shape == ob.shape and oa.dtype == ob.dtype and sa.shape == sb.shape and sa.dtype == torch.float32
    assert _rel(oa, ob) < tol and _rel(sa, sb) < tol, (_rel(oa, ob), _rel(sa, sb))
    gen = torch.Generator().manual_seed(7)
    do, ds = torch.randn(oa.shape, generator=gen), torch.randn(sa.shape, generator=gen)
    ((oa * do).sum() + (sa * ds).sum()).backward()
    ((ob * do).sum() + (sb * ds).sum()).backward()
    for i, (a, b) in enumerate(zip(xa, xb)):
        if a.grad is None and b.grad is None:
            continue
        assert _rel(a.grad, b.grad) < tol, (i, _rel(a.grad, b.grad))


def _gdn_inputs(B, T, H, HV, K, V, N, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    v = torch.randn(B, T, HV, V, generator=gen)
    g = -torch.rand(B, T, HV, generator=gen) * 0.3
    beta = torch.rand(B, T, HV, generator=gen)
    h0 = torch.randn(N, HV, K, V, generator=gen) * 0.5
    return [q, k, v, g, beta, h0]


@pytest.mark.parametrize("B, HV, bounds", [(1, 2, [0, 13, 14, 37]), (1, 6, [0, 20, 37]), (2, 4, None)])
def test_gated_delta_rule_through_fla_matches_the_torch_path(fla_reference, B, HV, bounds):
    """cu_seqlens (a one-token document too), an initial state, grouped value heads (HV = 3H)."""
    H, K, V, T = 2, 8, 6, 37
    cu = None if bounds is None else attach_host_bounds(torch.tensor(bounds, dtype=torch.int32))
    N = B if cu is None else len(bounds) - 1
    inputs = _gdn_inputs(B, T, H, HV, K, V, N)
    op = GatedDeltaRuleOp("fla", chunk_size=16)
    kernel = op.kernel(inputs[0])
    assert kernel.func is fla_backend.fla_chunk_gated_delta_rule

    def run(fn):
        return lambda q, k, v, g, b, h0: fn(q, k, v, g, b, scale=0.3, initial_state=h0, output_final_state=True,
                                            cu_seqlens=cu)

    _compare(run(kernel), run(lambda *a, **kw: chunk_gated_delta_rule(*a, **kw, chunk_size=16)), inputs)


@pytest.mark.parametrize("B, bounds", [(1, [0, 9, 40]), (2, None)])
def test_lightning_through_fla_simple_gla_matches_the_torch_path(fla_reference, B, bounds):
    H, K, V, T = 3, 8, 8, 40
    cu = None if bounds is None else attach_host_bounds(torch.tensor(bounds, dtype=torch.int32))
    N = B if cu is None else len(bounds) - 1
    q, k, v, _, _, h0 = _gdn_inputs(B, T, H, H, K, V, N, seed=1)
    slope = torch.tensor([0.5, 0.1, 0.02])
    kernel = LightningAttnOp("fla").kernel(q)
    assert kernel.func is fla_backend.fla_chunk_lightning_attn

    def run(fn):
        return lambda q, k, v, h0: fn(q, k, v, slope, initial_state=h0, output_final_state=True, cu_seqlens=cu)

    _compare(run(kernel), run(chunk_lightning_attn), [q, k, v, h0])


def test_state_layout_is_checked(fla_reference):
    """A release returning V-first states ([N, HV, V, K]) is refused, not silently transposed."""
    def transposed(*a, **kw):
        o, s = ref_chunk_gated_delta_rule(*a, **kw)
        return o, s.transpose(-1, -2)

    fla_backend.set_fla_kernels(transposed, ref_chunk_simple_gla)
    q, k, v, g, b, h0 = _gdn_inputs(1, 16, 2, 2, 8, 6, 1)
    with pytest.raises(RuntimeError, match=r"\[N, HV, K, V\]"):
        fla_backend.fla_chunk_gated_delta_rule(q, k, v, g, b, initial_state=h0, output_final_state=True)


def test_context_parallel_state_passing_through_fla(fla_reference):
    """cp state passing (zigzag chunks, document pieces, V + K state columns, incoming states) calls
    the op's fla kernel: equal to the single-device torch path, with gradients (one gloo rank)."""
    import torch.distributed as dist

    from lctrain.parallel.context import cp_gated_delta_rule, cp_lightning_attn
    from lctrain.parallel.context.handle import ContextParallel

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:  # degree 1: this rank holds both zigzag chunks; the second continues the first's state
        w = dist.group.WORLD
        cp = ContextParallel(w, 0, 1, "ring", 1, None, 0, w, 0, 1, (0,))
        T, H, HV, K, V = 48, 2, 4, 8, 6
        bounds = [0, 10, 31, 48]
        cu = attach_host_bounds(torch.tensor(bounds, dtype=torch.int32))
        q, k, v, g, b, _ = _gdn_inputs(1, T, H, HV, K, V, 3, seed=2)
        kernel = GatedDeltaRuleOp("fla").kernel(q)

        def cp_run(q, k, v, g, b):
            return cp_gated_delta_rule(q, k, v, g, b, cp, cu_seqlens=cu, kernel=kernel), torch.zeros(1)

        def ref(q, k, v, g, b):
            return chunk_gated_delta_rule(q, k, v, g, b, cu_seqlens=cu)[0], torch.zeros(1)

        _compare(cp_run, ref, [q, k, v, g, b])
        slope = torch.tensor([0.3, 0.05])
        ql, kl, vl = q, k, torch.randn(1, T, H, V)
        lk = LightningAttnOp("fla").kernel(ql)
        _compare(lambda q, k, v: (cp_lightning_attn(q, k, v, slope, cp, cu_seqlens=cu, kernel=lk), torch.zeros(1)),
                 lambda q, k, v: (chunk_lightning_attn(q, k, v, slope, cu_seqlens=cu)[0], torch.zeros(1)), [ql, kl, vl])
    finally:
        dist.destroy_process_group()


def test_model_with_the_fla_plan_trains_like_the_torch_plan(fla_reference):
    """A hybrid model (Gated DeltaNet with grouped value heads, Lightning, attention) under the
    ``model.kernels=fla`` plan: the loss and every parameter gradient equal the torch plan's."""
    from lctrain.config import load_config
    from lctrain.kernels.ops import sequence_ops
    from lctrain.kernels.plan import apply_kernel_plan, resolve_kernel_plan
    from lctrain.models import HybridLM

    cfg = load_config(["recipe=hybrid_gdn_3to1", "model.d_model=32", "model.vocab_size=64", "model.n_layers=3",
                       "model.layer_pattern=GLA", "model.attn.num_heads=2", "model.attn.num_kv_heads=1",
                       "model.attn.head_dim=16", "model.gdn.num_heads=2", "model.gdn.head_dim=8",
                       "model.gdn.num_value_heads=4", "model.lightning.num_heads=2", "model.lightning.head_dim=16"])
    plan = resolve_kernel_plan("fla", "cuda")  # the plan a GPU run takes; its fla ops run the references here
    assert plan.choice["gated_delta_rule"] == plan.choice["lightning_attn"] == "fla"
    assert plan.ops["gated_delta_rule"] == "fla_chunk" and plan.ops["lightning_attn"] == "fla_simple_gla"
    ids = torch.randint(0, 64, (1, 41), generator=torch.Generator().manual_seed(3))
    cu = attach_host_bounds(torch.tensor([0, 17, 40], dtype=torch.int32))
    results = []
    for kernels in ("fla", "torch"):
        torch.manual_seed(0)
        model = HybridLM(cfg.model)
        apply_kernel_plan(model, plan if kernels == "fla" else resolve_kernel_plan("torch", "cpu"))
        for *_, op in sequence_ops(model):
            if type(op).__name__ == "SoftmaxAttentionOp":
                op.kernels = "torch"  # no Triton interpreter for attention: this test is about fla's ops
        logits = model(ids[:, :-1], cu_seqlens=cu)[0]
        loss = F.cross_entropy(logits.reshape(-1, 64), ids[0, 1:])
        loss.backward()
        results.append((float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (lf, gf), (lt, gt) = results
    assert abs(lf - lt) <= 1e-5 * abs(lt) and set(gf) == set(gt)
    for name in gt:
        assert _rel(gf[name], gt[name]) < 1e-4, name


@pytest.mark.parametrize("missing", [True, False])
def test_kernels_fla_stops_at_start_up_with_one_error_line(tmp_path, missing):
    """``model.kernels=fla`` where fla-core does not import: exit 2, one ``error:`` line naming the
    extra; with fla-core on a CPU run: one line saying fla's kernels need a GPU."""
    hide = "sys.modules['fla'] = None; " if missing else ""
    code = (f"import sys; {hide}sys.argv = ['train', 'recipe=hybrid_gdn_3to1', 'scale=cpu', "
            f"'model.kernels=fla', 'train.out_dir={tmp_path / 'run'}']; import runpy; "
            "runpy.run_path('launch/train.py', run_name='__main__')")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    want = ('pip install -e ".[fla]"', "fla-core==") if missing else ("GPUs only", "model.kernels=auto")
    assert len(err) == 1 and all(w in err[0] for w in want), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
