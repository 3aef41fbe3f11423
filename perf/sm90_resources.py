"""What each kernel of the readout with `β` (`dla/ops/readout/objects_delta_triton.py`) asks of an
H100, without one: every kernel compiled by Triton's GPU compiler for sm_90a at the launcher's GPU
tiles and launch options, its shared memory from Triton's metadata, its registers and spills from
ptxas (`-v`). Spilled registers go to local memory, through L1 to L2 and DRAM: a kernel that
spills kilobytes per thread moves far more bytes than `cost_delta` counts.

    python -m perf.sm90_resources [SPEC ...]      # SPEC = Dk:L:C:R:dtype:g|none, default the §7 one
    python -m perf.sm90_resources --check-shared 128:32:64:16:bfloat16:g

`--check-shared` exits non-zero when a kernel's shared memory is past what a block may use on
sm_90 (such a kernel compiles but cannot launch). Runs on the CPU (Triton's wheel ships ptxas).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton

import dla.ops.readout.objects_delta_triton as X
from dla.ops.backbone.delta_common import precisions
from dla.ops.readout.cost_delta import BAND_KEYS, band_visits
from dla.testing import PTXAS, compile_for_sm90

HOPPER_SHARED = 232448  # bytes of shared memory a block may use on sm_90
KERNELS = ("_ut_kernel", "_suffix_kernel", "_object_kernel", "_readout_kernel", "_readout_bwd_chain_kernel",
           "_readout_bwd_band_kernel", "_object_grad_kernel", "_object_bwd_kernel", "_suffix_bwd_kernel",
           "_ut_bwd_kernel")
INTS = {"CM": "*i32", "PHI": "*i32", "FIRST": "*i32", "LAST": "*i32", "T": "i32", "NW": "i32", "scale": "fp32"}
FLOAT32 = ("G", "BETA", "TI", "EB", "KT", "SUF", "MB", "SCR", "XF", "DR", "DQH", "DAT", "DL", "DEB", "DHB", "DGC",
           "DVK", "DKT", "DSUF", "SB", "DBETA", "DG_OUT")


def compile_kernel(name: str, spec: str):
    """The kernel `name` compiled for sm_90a at `spec` (`Dk:L:C:R:dtype:g|none`), as the launchers
    call it on the GPU (`_meta`, `LAUNCH`; `XP` and `XS` in bfloat16 for 16-bit inputs)."""
    D, L, C, R, dtype, has_g = spec.split(":")
    D, L, C, R, dtype = int(D), int(L), int(C), int(R), getattr(torch, dtype)
    data = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}[dtype]
    xp = "*fp32" if dtype == torch.float32 else "*bf16"  # the band pass's queries: bfloat16 for 16-bit inputs
    prec, prec_solve = precisions(dtype)
    meta = dict(X._meta(D, D, interpreted=False), H=16, DK=D, DV=D, L=L, C=C, R=R, BC=16, HAS_G=has_g == "g",
                PREC=prec, PREC_SOLVE=prec_solve, PREC_CHAIN=prec_solve, LP=triton.next_power_of_2(L),
                BVP=triton.next_power_of_2(D), SPLIT=dtype == torch.bfloat16, INTERP=False,
                KEYS=BAND_KEYS, VISITS=max(1, band_visits(R)))
    fn = getattr(X, name)
    names = [a.name for a in fn.params]
    constexprs = {k: v for k, v in meta.items() if k in names}
    if name == "_object_bwd_kernel":
        constexprs["BV"] = meta["BVO"]
    def arg_type(a: str) -> str:
        return INTS.get(a, "*fp32" if a in FLOAT32 else xp if a in ("XP", "XS") else data)

    return compile_for_sm90(fn, arg_type, constexprs, **X.LAUNCH.get(name, {}))


def ptxas_report(kernel) -> dict:
    """Registers per thread and spill bytes (stores, loads) from `ptxas -v` on the kernel's PTX."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(kernel.asm["ptx"])
        err = subprocess.run([PTXAS, "-v", "-arch=sm_90a", path, "-o",
                              os.devnull], capture_output=True, text=True, check=True).stderr
    spills = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", err)
    regs = re.search(r"Used (\d+) registers", err)
    return {"registers": int(regs.group(1)), "stack": int(spills.group(1)), "spill_stores": int(spills.group(2)),
            "spill_loads": int(spills.group(3))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("specs", nargs="*", default=["128:32:64:16:bfloat16:g"])
    parser.add_argument("--check-shared", action="store_true", help="shared memory only, non-zero past sm_90's")
    args = parser.parse_args(argv)
    rc = 0
    for spec in args.specs:
        for name in KERNELS:
            kernel = compile_kernel(name, spec)
            shared = kernel.metadata.shared
            line = f"{spec} {name}: compiled, shared {shared} B"
            if shared > HOPPER_SHARED:
                line += f" > {HOPPER_SHARED}"
                rc = 1
            if not args.check_shared:
                r = ptxas_report(kernel)
                line += (f", {r['registers']} registers, spill stores {r['spill_stores']} B, "
                         f"loads {r['spill_loads']} B per thread")
            print(line, flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
