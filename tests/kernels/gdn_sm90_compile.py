"""Ahead-of-time compile the gated delta rule Triton kernels for sm90 (H100) without a GPU.

The interpreter accepts code that the compiler rejects and never checks resources, so the slow
test runs this in a subprocess (TRITON_INTERPRET unset): every kernel of ``triton_kernels.py`` is
compiled for ``GPUTarget("cuda", 90, 32)`` with the launch options the wrapper uses, and its
shared memory must fit an H100 block (227 KB). Needs only the triton wheel (it ships ptxas).

    python tests/kernels/gdn_sm90_compile.py bf16 128     # dtype (bf16|fp16|fp32), head dim K = V

Prints one line per kernel; exits non-zero on the first failure.
"""

from __future__ import annotations

import inspect
import os
import sys

H100_SHARED_BYTES = 232448


def main(dtype: str, dim: int) -> int:
    os.environ.pop("TRITON_INTERPRET", None)
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lctrain.kernels.gated_delta_rule import triton_kernels as tk
    from lctrain.kernels.gated_delta_rule.triton_chunk import (
        BT, _bwd_launch, _dh_v_block, _dot_config, _k_tile, _launch, _pow2, _prep_launch, _wy_prec,
    )

    tdt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    ptr = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}[dtype]
    BK = _pow2(dim)
    BV = min(64, _pow2(dim))
    types = {n: "*i32" for n in ("chunk_bos", "chunk_eos", "seq_bos", "seq_eos", "seq_chunk0")}
    inter = ("w", "u", "w_out", "u_out", "h", "h_out", "vnew", "vnew_out", "dh", "dh_out", "dnv", "dnv_out")
    types.update({n: ptr for n in ("q", "k", "v", "do", "o", *inter)})
    types.update(scale="fp32", TT="i32")
    common = dict(H=4, HV=8, K=dim, V=dim, BT=BT, BK=BK, BV=BV, **_dot_config(tdt), WPREC=_wy_prec(tdt))
    jobs = [
        (tk._prep_kernel, {"BK": _k_tile(dim)}, _prep_launch(dim)),
        (tk._fwd_h_kernel, {"HAS_H0": True}, _launch(BK)),
        (tk._fwd_o_kernel, {}, _launch(BK)),
        (tk._bwd_dv_local_kernel, {}, _launch(BK)),
        (tk._bwd_dh_kernel, {"HAS_DHT": True, "BV": _dh_v_block(BK, BV)}, _launch(BK)),
        (tk._bwd_wy_v_kernel, {"BK": _k_tile(dim)}, _bwd_launch("wy_v", dim)),
        (tk._bwd_dqk_kernel, {"BK": _k_tile(dim)}, _bwd_launch("dqk", dim)),
        (tk._bwd_wy_kernel, {"BK": _k_tile(dim)}, _bwd_launch("wy", dim)),
        (tk._fused_recurrent_kernel, {"BV": min(32, BV), "HAS_H0": True, "STORE_HT": True},
         {"num_warps": 4, "num_stages": 1}),
    ]
    target = GPUTarget("cuda", 90, 32)
    for fn, extra, opts in jobs:
        params = inspect.signature(fn.fn).parameters
        consts = {k: v for k, v in {**common, **extra}.items() if k in params}
        sig = {}
        for n in params:
            sig[n] = "constexpr" if n in consts else types.get(n, "*fp32")
        try:
            ck = triton.compile(ASTSource(fn, sig, consts), target=target, options=opts)
        except Exception as e:
            print(f"{fn.__name__}: COMPILE FAILED {type(e).__name__}: {str(e)[:2000]}")
            return 1
        shared = ck.metadata.shared
        ok = shared <= H100_SHARED_BYTES
        print(f"{fn.__name__}: ok={ok} shared={shared} B opts={opts}")
        if not ok:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
