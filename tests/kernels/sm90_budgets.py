"""Compile every Triton kernel for sm90 at the scale presets' shapes; record and bound its resources.

For each kernel (FlashAttention, MoBA, Lightning Attention, Gated DeltaNet, the MoE grouped
GEMM), in bf16 with the launch configuration the wrappers pick on CUDA, at the presets' head dims
(``lctrain/recipes/scale/*.yaml``: attention 64 / 128, MoBA block 512, Lightning 128, Gated
DeltaNet K = V = 64 / 128 / 256), this compiles a cubin for ``GPUTarget("cuda", 90, 32)`` (no GPU
needed: the triton wheel ships ptxas), runs the same ptxas with ``-v`` on its PTX, and records
registers per thread, spill stores / loads (bytes per thread), stack frame and shared memory per
block in ``benchmarks/results/sm90_budgets.json``.

Budgets: shared memory <= 227 KB (an H100 block) and at most ``SPILL_BUDGET`` bytes of spill
stores and of spill loads per thread (a few hundred bytes stay in L1; kilobytes per thread
are what make a kernel slow), except the kernels listed in ``KNOWN_SPILLS``, which may not spill
more than recorded there (a ceiling against regressions while they wait to be split). Exit
status 1 past a budget.

    python tests/kernels/sm90_budgets.py [--only gdn,flash,...] [--merge] [--out PATH]
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
H100_SHARED_BYTES = 232448
SPILL_BUDGET = 1024
# kernel case -> (spill stores, spill loads) in bytes per thread that it may not exceed: the
# kernels over SPILL_BUDGET, at what they spilled with triton 3.9 (the Gated DeltaNet prep's
# forward substitution and block-Neumann dots; the reverse state pass at K = 256).
KNOWN_SPILLS: dict[str, tuple[int, int]] = {
    "gdn._prep_kernel K=64": (2080, 2084),
    "gdn._prep_kernel K=128": (2132, 2760),
    "gdn._prep_kernel K=256": (2516, 3136),
    "gdn._bwd_dh_kernel K=256": (1384, 1624),
}


def _ptxas_info(ptx: str) -> dict:
    """Registers, spills and stack of the PTX's kernel from ``ptxas -v`` for sm_90a."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(90).path
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        res = subprocess.run(
            [ptxas, "-v", "--gpu-name", "sm_90a", str(src), "-o", str(Path(d) / "k.cubin")],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
    if res.returncode:
        raise RuntimeError(f"ptxas failed: {res.stderr[-2000:]}")
    text = res.stderr

    def grab(pattern: str) -> int:
        m = re.search(pattern, text)
        return int(m.group(1)) if m else 0

    return {
        "registers": grab(r"Used (\d+) registers"),
        "spill_stores": grab(r"(\d+) bytes spill stores"),
        "spill_loads": grab(r"(\d+) bytes spill loads"),
        "stack_frame": grab(r"(\d+) bytes stack frame"),
    }


def _compile(fn, sig: dict, consts: dict, num_warps: int, num_stages: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    params = list(inspect.signature(fn.fn).parameters)
    src = ASTSource(fn, sig, constexprs={(params.index(k),): v for k, v in consts.items()})
    return triton.compile(
        src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )


def _signature(fn, consts: dict, ptr_types: dict, floats=("scale", "scale_log2")) -> dict:
    sig = {}
    for p in inspect.signature(fn.fn).parameters:
        if p in consts:
            sig[p] = "constexpr"
        elif p in ptr_types:
            sig[p] = ptr_types[p]
        else:
            sig[p] = "fp32" if p in floats else "i32"
    return sig


def flash_cases():
    import torch

    from lctrain.kernels.flash_attn import interface
    from lctrain.kernels.flash_attn import triton_kernels as tk

    ptrs = {p: "*bf16" for p in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")}
    ptrs.update({p: "*fp32" for p in ("LSE", "DELTA")})
    ptrs.update({p: "*i32" for p in ("CU_Q", "CU_K")})
    for D in (64, 128):
        for fn, backward in ((tk._fwd_kernel, False), (tk._bwd_dkdv_kernel, True), (tk._bwd_dq_kernel, True)):
            cfg = interface._config(D, backward, torch.bfloat16)
            warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
            consts = dict(cfg, GROUP=4, HAS_LEFT=False, HAS_RIGHT=True, DOT_PREC="tf32")
            yield f"flash.{fn.fn.__name__} D={D}", fn, _signature(fn, consts, ptrs), consts, warps, stages


def moba_cases():
    import torch

    from lctrain.kernels.moba import interface
    from lctrain.kernels.moba import triton_kernels as tk

    ptrs = {p: "*bf16" for p in ("Q", "K", "V", "DO", "DK", "DV")}
    ptrs.update({p: "*fp32" for p in ("O", "LSE", "OP", "LSEP", "DELTA", "DQ", "DQP")})
    ptrs.update({p: "*i32" for p in ("BLK_START", "BLK_LEN", "SEG_GROUP", "LANE_PAIR", "GROUP_START",
                                      "GROUP_COUNT", "SORTED_PAIRS")})  # fmt: skip
    kernels = [(tk._own_fwd_kernel, False), (tk._pair_fwd_kernel, False), (tk._own_dq_kernel, True),
               (tk._pair_dq_kernel, True), (tk._dkdv_kernel, True)]  # fmt: skip
    for D in (64, 128):
        for fn, backward in kernels:
            cfg = interface._config(D, 512, backward, torch.bfloat16)
            warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
            consts = dict(cfg, DOT_PREC="tf32")
            if "GROUP" in inspect.signature(fn.fn).parameters:
                consts["GROUP"] = 4
            yield f"moba.{fn.fn.__name__} D={D} block=512", fn, _signature(fn, consts, ptrs), consts, warps, stages


def lightning_cases():
    import triton

    from lctrain.kernels.lightning_attn import triton_chunk as tc
    from lctrain.kernels.lightning_attn import triton_kernels as tk

    ptrs = {p: "*bf16" for p in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")}
    ptrs.update({p: "*fp32" for p in ("STATES", "DSTATES", "H0", "HT", "DHT", "DH0", "SLOPE")})
    ptrs.update({p: "*i32" for p in ("CU", "BLOCK_OFF", "BLOCK_SEQ", "BLOCK_IDX")})
    for D in (64, 128):
        bk, bv = tc._state_tiles(D, D)
        full = max(16, triton.next_power_of_2(D))
        jobs = [
            (tk._state_fwd, {"HAS_H0": True, "STORE_HT": True, "BK": bk, "BV": bv}, 4),
            (tk._output_fwd, {"BK": full, "BV": min(full, 64)}, 4),
            (tk._state_bwd, {"HAS_DHT": True, "STORE_DH0": True, "BK": bk, "BV": bv}, 4),
            (tk._block_bwd, {"BK": full, "BV": full}, 4 if full <= 64 else 8),
        ]
        for fn, extra, warps in jobs:
            consts = dict(extra, C=64, DOT_PREC="tf32")
            yield f"lightning.{fn.fn.__name__} D={D}", fn, _signature(fn, consts, ptrs), consts, warps, 1


def gdn_cases():
    import torch

    from lctrain.kernels.gated_delta_rule import triton_kernels as tk
    from lctrain.kernels.gated_delta_rule.triton_chunk import (
        BT, _bwd_launch, _dh_v_block, _dot_config, _k_tile, _launch, _pow2, _prep_launch, _wy_prec,
    )

    ptrs = {n: "*i32" for n in ("chunk_bos", "chunk_eos", "seq_bos", "seq_eos", "seq_chunk0")}
    inter = ("w", "u", "w_out", "u_out", "h", "h_out", "vnew", "vnew_out", "dh", "dh_out", "dnv", "dnv_out")
    ptrs.update({n: "*bf16" for n in ("q", "k", "v", "do", "o", *inter)})
    ptrs.update({n: "*fp32" for n in ("g", "beta", "gamma", "gamma_out", "x", "x_out", "h0", "ht", "ht_out",
                                      "dvl", "dht", "dh0_out", "dq", "dk", "dv", "dg", "dbeta",
                                      "dad", "dad_out", "dxv", "dxv_out", "dw", "dw_out", "dgp")})  # fmt: skip
    for dim in (64, 128, 256):
        BK, BV = _pow2(dim), min(64, _pow2(dim))
        common = dict(H=8, HV=8, K=dim, V=dim, BT=BT, BK=BK, BV=BV, **_dot_config(torch.bfloat16),
                      WPREC=_wy_prec(torch.bfloat16))
        jobs = [
            (tk._prep_kernel, {"BK": _k_tile(dim)}, _prep_launch(dim)),
            (tk._fwd_h_kernel, {"HAS_H0": True}, _launch(BK)),
            (tk._fwd_o_kernel, {}, _launch(BK)),
            (tk._bwd_dv_local_kernel, {}, _launch(BK)),
            (tk._bwd_dh_kernel, {"HAS_DHT": True, "BV": _dh_v_block(BK, BV)}, _launch(BK)),
            (tk._bwd_wy_v_kernel, {"BK": _k_tile(dim)}, _bwd_launch("wy_v", dim)),
            (tk._bwd_dqk_kernel, {"BK": _k_tile(dim)}, _bwd_launch("dqk", dim)),
            (tk._bwd_wy_kernel, {"BK": _k_tile(dim)}, _bwd_launch("wy", dim)),
        ]
        for fn, extra, opts in jobs:
            params = inspect.signature(fn.fn).parameters
            consts = {k: v for k, v in {**common, **extra}.items() if k in params}
            sig = _signature(fn, consts, ptrs, floats=("scale",))
            yield f"gdn.{fn.fn.__name__} K={dim}", fn, sig, consts, opts["num_warps"], opts["num_stages"]


def moe_cases():
    from lctrain.kernels.moe import triton_grouped as tg

    ptrs = {p: "*bf16" for p in ("x_ptr", "w_ptr", "out_ptr", "dy_ptr", "dw_ptr")}
    ptrs.update({p: "*i32" for p in ("starts_ptr", "ends_ptr", "tile_expert_ptr", "tile_row_ptr")})
    consts = {"BLOCK_M": tg.BLOCK_M, "BLOCK_N": tg.BLOCK_N, "BLOCK_K": tg.BLOCK_K, "DOT_PREC": "tf32"}
    for fn in (tg._grouped_mm_kernel, tg._grouped_wgrad_kernel):
        yield f"moe.{fn.fn.__name__}", fn, _signature(fn, consts, ptrs), consts, 4, 1


FAMILIES = {"flash": flash_cases, "moba": moba_cases, "lightning": lightning_cases, "gdn": gdn_cases,
            "moe": moe_cases}  # fmt: skip


def check_budget(name: str, rec: dict) -> list[str]:
    """Why ``rec`` (one kernel's record) is over budget; empty when it is within."""
    why = []
    if rec["shared"] > H100_SHARED_BYTES:
        why.append(f"shared {rec['shared']} > {H100_SHARED_BYTES}")
    stores, loads = KNOWN_SPILLS.get(name, (SPILL_BUDGET, SPILL_BUDGET))
    if rec["spill_stores"] > stores or rec["spill_loads"] > loads:
        why.append(f"spills {rec['spill_stores']}/{rec['spill_loads']} B > budget {stores}/{loads}")
    return why


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(FAMILIES), help="comma-separated kernel families")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "sm90_budgets.json"))
    ap.add_argument("--merge", action="store_true",
                    help="keep the other families' records of an existing --out file (with --only)")
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    import triton

    records, failures = {}, []
    for family in args.only.split(","):
        for name, fn, sig, consts, warps, stages in FAMILIES[family]():
            t0 = time.perf_counter()
            kernel = _compile(fn, sig, consts, warps, stages)
            rec = {"num_warps": warps, "num_stages": stages, "shared": kernel.metadata.shared,
                   **_ptxas_info(kernel.asm["ptx"]), "compile_s": round(time.perf_counter() - t0, 2)}  # fmt: skip
            why = check_budget(name, rec)
            rec["within_budget"] = not why
            rec["known_spills"] = name in KNOWN_SPILLS
            records[name] = rec
            print(f"{name}: regs={rec['registers']} spills={rec['spill_stores']}/{rec['spill_loads']} "
                  f"shared={rec['shared']} {'OK' if not why else 'OVER ' + '; '.join(why)}", flush=True)  # fmt: skip
            failures += [f"{name}: {w}" for w in why]
    if args.merge and Path(args.out).exists():  # the other families' records as they were
        chosen = set(args.only.split(","))
        kept = {k: v for k, v in json.loads(Path(args.out).read_text())["kernels"].items()
                if k.split(".")[0] not in chosen}  # fmt: skip
        for name, rec in kept.items():
            why = check_budget(name, rec)
            rec["within_budget"], rec["known_spills"] = not why, name in KNOWN_SPILLS
            failures += [f"{name}: {w}" for w in why]
        records = {**kept, **records}
    out = {
        "target": "sm90 (GPUTarget('cuda', 90, 32)), bf16, the wrappers' CUDA launch configurations",
        "triton": triton.__version__,
        "shared_budget_bytes": H100_SHARED_BYTES,
        "spill_budget_bytes": SPILL_BUDGET,
        "known_spills": {k: list(v) for k, v in KNOWN_SPILLS.items()},
        "kernels": records,
        "failures": failures,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}: {len(records)} kernels, {len(failures)} over budget")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
