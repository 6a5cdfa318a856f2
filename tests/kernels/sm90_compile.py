"""Ahead-of-time compile Triton kernels for sm90 (H100) without a GPU, in a subprocess.

The Triton interpreter accepts code that the compiler rejects (e.g. non-constexpr globals) and
never checks resources, so the slow tests compile every kernel to a cubin for
``GPUTarget("cuda", 90, 32)`` with the launch configuration the wrappers pick on CUDA, and
check that its shared memory fits an H100 (227 KB per block). Needs only the triton wheel (it
ships ptxas). Run as ``python sm90_compile.py flash|lightning``; prints one line per kernel and
exits non-zero on the first failure.
"""

from __future__ import annotations

import inspect
import os
import sys

H100_SHARED_BYTES = 232448

PTR_INPUT = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
PTR_F32 = {"LSE", "DELTA", "STATES", "DSTATES", "H0", "HT", "DHT", "DH0", "SLOPE"}
PTR_I32 = {"CU_Q", "CU_K", "CU", "BLOCK_OFF", "BLOCK_SEQ", "BLOCK_IDX"}
FLOATS = {"scale", "scale_log2"}


def compile_sm90(fn, consts: dict, num_warps: int, num_stages: int, dtype: str) -> int:
    """Compile ``fn`` for sm90 with ``consts``; return its shared-memory bytes."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    params = list(inspect.signature(fn.fn).parameters)
    sig = {}
    for p in params:
        if p in consts:
            sig[p] = "constexpr"
        elif p in PTR_INPUT:
            sig[p] = "*" + dtype
        elif p in PTR_F32:
            sig[p] = "*fp32"
        elif p in PTR_I32:
            sig[p] = "*i32"
        else:
            sig[p] = "fp32" if p in FLOATS else "i32"
    src = ASTSource(fn, sig, constexprs={(params.index(k),): v for k, v in consts.items()})
    kernel = triton.compile(
        src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )
    return kernel.metadata.shared


def _launch_opts(cfg: dict) -> tuple[dict, int, int]:
    cfg = dict(cfg)
    return cfg, cfg.pop("num_warps"), cfg.pop("num_stages")


def flash_cases():
    import torch

    from lctrain.kernels.flash_attn import interface
    from lctrain.kernels.flash_attn import triton_kernels as tk

    for dtype, tdt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        for head_dim in (64, 128):
            prec = interface._dot_precision(tdt)
            for fn, backward in (
                (tk._fwd_kernel, False),
                (tk._bwd_dkdv_kernel, True),
                (tk._bwd_dq_kernel, True),
            ):
                cfg, warps, stages = _launch_opts(interface._config(head_dim, backward, tdt))
                consts = dict(cfg, GROUP=2, HAS_LEFT=True, HAS_RIGHT=True, DOT_PREC=prec)
                yield f"{fn.fn.__name__} {dtype} D={head_dim}", fn, consts, warps, stages, dtype


def lightning_cases():
    import triton

    from lctrain.kernels.lightning_attn import triton_chunk as tc
    from lctrain.kernels.lightning_attn import triton_kernels as tk

    # the largest head dims the wrapper accepts, with the block size it picks on CUDA
    for dtype, dims, chunk in (("bf16", 128, 64), ("fp32", 128, 32)):
        prec = "ieee" if dtype == "fp32" else "tf32"
        bk, bv = tc._state_tiles(dims, dims)
        full = max(16, triton.next_power_of_2(dims))
        yield (
            f"_state_fwd {dtype} D={dims}",
            tk._state_fwd,
            {"HAS_H0": True, "STORE_HT": True, "C": chunk, "BK": bk, "BV": bv, "DOT_PREC": prec},
            4,
            1,
            dtype,
        )
        yield (
            f"_output_fwd {dtype} D={dims}",
            tk._output_fwd,
            {"C": chunk, "BK": full, "BV": min(full, 64), "DOT_PREC": prec},
            4,
            1,
            dtype,
        )
        yield (
            f"_state_bwd {dtype} D={dims}",
            tk._state_bwd,
            {"HAS_DHT": True, "STORE_DH0": True, "C": chunk, "BK": bk, "BV": bv, "DOT_PREC": prec},
            4,
            1,
            dtype,
        )
        yield (
            f"_block_bwd {dtype} D={dims}",
            tk._block_bwd,
            {"C": chunk, "BK": full, "BV": full, "DOT_PREC": prec},
            4 if full <= 64 else 8,
            1,
            dtype,
        )


def main(which: str) -> int:
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run with TRITON_INTERPRET=0"
    cases = flash_cases() if which == "flash" else lightning_cases()
    for name, fn, consts, warps, stages, dtype in cases:
        shared = compile_sm90(fn, consts, warps, stages, dtype)
        print(f"{name}: warps={warps} stages={stages} shared={shared}", flush=True)
        if shared > H100_SHARED_BYTES:
            print(f"FAIL {name}: {shared} bytes of shared memory > {H100_SHARED_BYTES}")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
