"""What each Triton kernel of the `β` path asks of an H100, without one: the readout with `β`
(`dla/ops/readout/objects_delta_triton.py`), the chunked delta rule under it and under `single`
(`dla/ops/backbone/delta_{wy,states,output}.py`) and the `drift` detection
(`dla/ops/segment/detect_triton.py`), each compiled by Triton's GPU compiler for sm_90a at its
launcher's GPU tiles and launch options: its shared memory from Triton's metadata, its registers
and spills from ptxas (`-v`). Spilled registers go to local memory, through L1 to L2 and DRAM: a
kernel that spills kilobytes per thread moves far more bytes than `cost_delta` counts, and in a
sequential kernel (the state passes) every spill sits on the critical path.

    python -m perf.sm90_resources [SPEC ...] [--stages readout backbone drift wy]
                                                  # SPEC = Dk:L:C:R:dtype:g|none, default the §7 one
    python -m perf.sm90_resources --check-shared 128:32:64:16:bfloat16:g

The backbone's kernels take the spec's `Dk` (= `Dv`), chunk, dtype and gate, the other optional
inputs as `single` has them, its state passes every `Dv` tile `delta_states.state_tile` can
pick; the detection runs in float32 whatever the inputs (its launcher casts them), with `β` and
without, and the spec's gate.

These are static counts, not timings, and they do not rank launch options by speed: ptxas gives
the detection's pass kernel at its shipped tiles 32 registers and 4.5–5.6 KB of spills per
thread, and at a chunk of 16 beside the same 32-wide tile 255 registers and a seventeenth of the
spills, yet on an H100 the former ran 19–21 times faster (`perf/results/sweep_drift-h100.md`,
the same kernel). Time on the card.

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

import dla.ops.backbone.delta_output as BO
import dla.ops.backbone.delta_states as BS
import dla.ops.backbone.delta_wy as BW
import dla.ops.readout.objects_delta_triton as X
import dla.ops.segment.detect_triton as DT
from dla.ops.backbone.delta_common import precisions
from dla.ops.readout.cost_delta import BAND_KEYS, band_visits
from dla.ops.triton_utils import pow2
from dla.testing import PTXAS, compile_for_sm90

HOPPER_SHARED = 232448  # bytes of shared memory a block may use on sm_90
KERNELS = ("_ut_kernel", "_suffix_kernel", "_initial_objects_kernel", "_object_kernel", "_readout_kernel",
           "_readout_bwd_chain_kernel", "_readout_bwd_band_kernel", "_object_grad_kernel", "_object_bwd_kernel",
           "_suffix_bwd_kernel", "_ut_bwd_kernel")
INTS = {"CM": "*i32", "SPAN": "*i16", "PHI": "*i32", "FIRST": "*i32", "LAST": "*i32", "T": "i32", "NW": "i32",
        "scale": "fp32"}
FLOAT32 = ("G", "BETA", "TI", "EB", "KT", "SUF", "SF", "S0", "SCR", "XF", "DR", "DQH", "DAT", "DL", "DEB", "DHB",
           "DGC", "DVK", "DKT", "DSUF", "SB", "DBETA", "DG_OUT")


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
                KEYS=BAND_KEYS, VISITS=max(1, band_visits(R)), RESIDUAL=dtype != torch.float32, FINAL=True,
                RP=pow2(R))
    meta["NVT"] = -(-D // meta["BVO"])  # the suffix backward sums the object backward's Dv tiles
    fn = getattr(X, name)
    names = [a.name for a in fn.params]
    constexprs = {k: v for k, v in meta.items() if k in names}
    if name in ("_initial_objects_kernel", "_object_bwd_kernel"):  # launched at the Dv tile BVO
        constexprs["BV"] = meta["BVO"]
    def arg_type(a: str) -> str:
        return INTS.get(a, "*fp32" if a in FLOAT32 else xp if a in ("XP", "XS") else data)

    return compile_for_sm90(fn, arg_type, constexprs, **X.LAUNCH.get(name, {}))


def _parse(spec: str):
    D, L, C, R, dtype, has_g = spec.split(":")
    return int(D), int(L), int(C), int(R), getattr(torch, dtype), has_g == "g"


# the chunked delta rule's optional inputs (gate, resets, initial state, U stored, the output's
# terms, an outer state gradient, a final state gradient), constexpr flags of its kernels
BACKBONE_OPTIONAL = ("HAS_G", "HAS_RESET", "HAS_S0", "STORE_U", "HAS_OUT", "HAS_DHX", "HAS_DSF")
BACKBONE_FLOAT32 = {"TI", "DU", "DKP", "DGP", "DUO", "DHX", "DSF", "DHS", "DS0", "SF", "S0", "G", "BETA", "DBETA",
                    "DG_OUT"}


def backbone_kernels(spec: str, tiles: list[int] | None = None, optional: tuple[bool, ...] | None = None):
    """`(label, compiled)` for the chunked delta rule's kernels at the spec's `Dk = Dv`, chunk and
    dtype, as `delta_triton` launches them (states in the inputs' dtype, `U` too, the backward's
    states, `dU` and partial gradients float32; `g`, `β` float32), the state passes at each `Dv`
    tile of `tiles` (default: every one `state_tile` can pick). The optional inputs as `single`
    has them (the spec's gate, an initial state and a final state gradient, no resets and no outer
    state gradient), or, for each entry of `optional`, all present or all absent."""
    D, _, C, _, dtype, has_g = _parse(spec)
    if optional is None:
        settings = [dict(dict.fromkeys(BACKBONE_OPTIONAL, True), HAS_G=has_g, HAS_RESET=False, HAS_DHX=False)]
    else:
        settings = [dict.fromkeys(BACKBONE_OPTIONAL, present) for present in optional]
    if tiles is None:
        tiles = sorted({min(b, triton.next_power_of_2(D)) for b in (64, 32, 16)}, reverse=True)
    out = BO.output_meta(D, D, C, dtype)
    runs = [(BW._wy_fwd_kernel, BW.wy_meta(D, D, C, dtype)), (BW._wy_bwd_kernel, BW.wy_meta(D, D, C, dtype))]
    for BV in tiles:
        runs += [(BS._states_fwd_kernel, BS.states_meta(D, D, C, dtype, BV)),
                 (BS._states_bwd_kernel, BS.states_meta(D, D, C, dtype, BV))]
    runs += [(BO._output_fwd_kernel, out["fwd"]), (BO._output_dU_kernel, out["dU"]),
             (BO._dqkwg_kernel, out["dqkwg"])]
    for flags in settings:
        for fn, meta in runs:
            label = f"{fn.__name__} (BV {meta['BV']}, {meta.get('num_warps', 4)} warps)"
            if optional is not None:
                label += f", optional inputs {'present' if flags['HAS_G'] else 'absent'}"
            yield label, backbone_compiled(fn, meta, D, dtype, flags)


def backbone_compiled(fn, meta: dict, D: int, dtype: torch.dtype, flags: dict):
    """The chunked delta rule's kernel `fn` compiled for sm_90 at `meta` (launch options
    included), `Dk = Dv = D`, H = 16 and the optional inputs' `flags`, its arguments typed as
    `delta_triton` passes them (`BACKBONE_FLOAT32` float32, the rest in the inputs' dtype)."""
    data = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}[dtype]

    def arg_type(a: str) -> str:
        return {"T": "i32", "scale": "fp32", "RESET": "*u8"}.get(a, "*fp32" if a in BACKBONE_FLOAT32 else data)

    meta = dict(meta)
    options = {k: meta.pop(k) for k in ("num_warps", "num_stages") if k in meta}
    names = {p.name for p in fn.params}
    given = {**meta, "H": 16, "DK": D, "DV": D, "BC": BW.BC, "SPLIT": dtype == torch.bfloat16, "INTERP": False,
             **flags}
    return compile_for_sm90(fn, arg_type, {k: v for k, v in given.items() if k in names}, **options)


def drift_kernels(spec: str):
    """`(label, compiled)` for the detection's kernels at the spec's `Dk = Dv` and gate, with `β`
    (Gated DeltaNet) and without (Mamba-2), float32 as the launcher runs them."""
    D, _, C, _, _, has_g = _parse(spec)
    for beta in (True, False):
        meta = DT.launch_meta(D, D, C, on_interpreter=False)
        options = dict(num_warps=meta.pop("num_warps"), num_stages=meta.pop("num_stages"))
        meta.update(HAS_G=has_g, HAS_BETA=beta)
        for fn in (DT._prepare_kernel, DT._pass_kernel):
            kernel = compile_for_sm90(fn, lambda a: "i32" if a in ("T", "H", "Dk", "Dv", "NC") else "*fp32", meta,
                                      **options)
            yield f"{fn.__name__} ({'β' if beta else 'no β'}, C {meta['C']}, BV {meta['BV']})", kernel
        meta = DT.scores_meta(D, D, on_interpreter=False)
        options = dict(num_warps=meta.pop("num_warps"), num_stages=1)
        meta.update(H=16, DK=D, DV=D, HAS_G=has_g, HAS_BETA=beta, EPS=1e-12)
        types = {"T": "i32", "tau": "fp32", "FIRST": "*i8", "FLAG": "*i1"}
        yield (f"_scores_kernel ({'β' if beta else 'no β'})",
               compile_for_sm90(DT._scores_kernel, lambda a: types.get(a, "*fp32"), meta, **options))


def readout_kernels(spec: str):
    for name in KERNELS:
        yield name, compile_kernel(name, spec)


def wy_launches(spec: str):
    """`(label, compiled)` for the WY stage's kernels at the shipped launch (`wy_meta`) and the
    others `perf.sweep_wy_gpu` times, at the spec's `Dk = Dv`, chunk, dtype and gate, every other
    optional input absent."""
    from perf.sweep_wy_gpu import BACKWARD_CANDIDATES, CANDIDATES

    D, _, C, _, dtype, has_g = _parse(spec)
    flags = dict(HAS_G=has_g, HAS_RESET=False)
    shipped = BW.wy_meta(D, D, C, dtype)
    first = (shipped["num_warps"], shipped["num_stages"], shipped["BK"], shipped["BV"])
    for warps, stages, bk, bv in [first] + [(w, s, b, b) for w, s, b in CANDIDATES]:
        meta = dict(shipped, num_warps=warps, num_stages=stages, BK=bk, BV=bv)
        yield (f"_wy_fwd_kernel ({warps} warps, {stages} stages, BK {bk}, BV {bv})",
               backbone_compiled(BW._wy_fwd_kernel, meta, D, dtype, flags))
    for warps, stages, bk, bv in [first] + BACKWARD_CANDIDATES:
        meta = dict(shipped, num_warps=warps, num_stages=stages, BK=bk, BV=bv)
        yield (f"_wy_bwd_kernel ({warps} warps, {stages} stages, BK {bk}, BV {bv})",
               backbone_compiled(BW._wy_bwd_kernel, meta, D, dtype, flags))


STAGES = {"readout": readout_kernels, "backbone": backbone_kernels, "drift": drift_kernels, "wy": wy_launches}


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
    parser.add_argument("--stages", nargs="+", choices=list(STAGES), default=["readout"])
    args = parser.parse_args(argv)
    rc = 0
    for spec in args.specs:
        for name, kernel in (k for stage in args.stages for k in STAGES[stage](spec)):
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
