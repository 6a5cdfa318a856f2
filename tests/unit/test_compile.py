"""``train.compile=true``: each block compiled by parallelize(); the compiled model trains with the eager losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lctrain.config import load_config
from lctrain.models import HybridLM
from lctrain.parallel import parallelize
from lctrain.parallel.mesh import DistEnv, ParallelDims

SMALL = ["model.d_model=32", "model.vocab_size=64", "model.n_layers=2", "model.layer_pattern=GA",
         "model.attn.num_heads=2", "model.attn.num_kv_heads=1", "model.attn.head_dim=16", "model.gdn.num_heads=2",
         "model.gdn.head_dim=16", "model.gdn.chunk_size=16", "model.kernels=torch"]


def _losses(compile_: bool, steps: int = 3, backend: str = "aot_eager") -> tuple[list[float], HybridLM]:
    cfg = load_config(["recipe=hybrid_gdn_3to1", *SMALL, f"train.compile={str(compile_).lower()}",
                       f"train.compile_backend={backend}"])
    torch.manual_seed(0)
    model = HybridLM(cfg.model)
    env, dims = DistEnv(0, 1, 0, torch.device("cpu"), None), ParallelDims(1, 1, 1)
    par = parallelize(model, dims, dims.build_meshes(env), cfg, env)
    opt = torch.optim.AdamW(par.model.parameters(), lr=1e-2)
    ids = torch.randint(0, 64, (1, 33), generator=torch.Generator().manual_seed(1))
    cu = torch.tensor([0, 12, 32], dtype=torch.int32)
    out = []
    for _ in range(steps):
        loss = F.cross_entropy(par.model(ids[:, :-1], cu_seqlens=cu)[0], ids[0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append(float(loss.detach()))
    return out, par.model


# inductor: about 2.5 min of C++ code generation on 2 shared cores (passed: 143.6 s), so marked slow
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_blocks_give_the_eager_losses(backend):
    """``train.compile=true``: the default backend (inductor, C++ code generated on CPU) and
    aot_eager train with the eager losses (1e-5)."""
    torch._dynamo.reset()
    eager, _ = _losses(False)
    compiled, model = _losses(True, backend=backend)
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in model.layers)  # really compiled
    for a, b in zip(compiled, eager):
        assert abs(a - b) <= 1e-5 * abs(b), (compiled, eager)
    assert set(model.state_dict()) == set(HybridLM(model.config).state_dict())  # same keys as uncompiled


def test_auto_kernel_choice_per_op_on_cuda_tensors():
    """``kernels=auto``: torch on CPU tensors; on CUDA the per-op table (Triton for every op)."""
    from types import SimpleNamespace

    from lctrain.kernels import dispatch

    cuda_like, cpu = SimpleNamespace(is_cuda=True), torch.zeros(1)
    assert not any(dispatch.use_triton("auto", cpu, op) for op in dispatch.AUTO_TRITON_ON_CUDA)
    assert all(dispatch.use_triton("triton", cpu, op) for op in dispatch.AUTO_TRITON_ON_CUDA)
    assert not dispatch.use_triton("torch", cuda_like, "gated_delta_rule")
    if dispatch.triton_installed():
        assert dispatch.use_triton("auto", cuda_like, "softmax_attention")
        assert dispatch.use_triton("auto", cuda_like, "gated_delta_rule")
        assert dispatch.use_triton("auto", cuda_like, "moba") and dispatch.use_triton("auto", cuda_like, "lightning_attn")
