"""Mutation smoke test: the suite's checks must catch known-bad variants of the package.

Each mutant is one small edit of one function's source — a flipped tie-break, `≥` made `>`, a
dropped factor, an off-by-one, two steps of a protocol swapped — compiled in that function's
module namespace and monkeypatched over it and over every other name bound to the same object
in a loaded module (Triton kernels are re-jitted from the edited source). Under the mutant the
named tests run in this process (`pytest.main`); every one of them must fail, and the test
fails when one passes (the mutant survived). A mutant whose edit no longer matches the source
fails here too, so the list follows the code.

The list: the two variants that once survived the whole CPU suite (a capacity-merge tie to the
newest pair; `I_t ≥ τ` made `>`), the three that were caught then (a dropped decay in the
backward, initial slots in the wrong order, the `latest` pointer written in place or before
the rename), and one at least per kernel stage — segment (the `drift` detection's threshold,
and the Triton segmentation's tie-break and boundary test beside the CPU kernel's), backbone
(the SSD chunk state carried through a reset), readout (the object plan, the object readout's
decay, the Triton band pass of the readout with β, its level spans — computed in place and
read from the chain pass — and dλ's last step, its object backward's first write of dK̃, its
masters' residuals and its split bfloat16 products, a buffer of it a row short) — each killed by
the property checks and unit cases named beside it."""

from __future__ import annotations

import inspect
import linecache
import sys
import textwrap
from dataclasses import dataclass

import pytest
from hypothesis import Phase, settings

import dla.operator
import dla.ops.backbone.ssd
import dla.ops.readout.chunked
import dla.ops.readout.objects
import dla.ops.readout.objects_delta_triton
import dla.ops.readout.plan
import dla.ops.segment.cpu
import dla.ops.segment.detect
import dla.ops.segment.triton_walk
import dla.ops.triton_utils
import dla.run.checkpoint

EDGES = "tests/test_segment_edges.py"


@dataclass(frozen=True)
class Mutant:
    name: str
    owner: object  # the module or class whose attribute is replaced
    attribute: str
    old: str  # a snippet of the attribute's source, found exactly once
    new: str
    killers: tuple[str, ...]  # pytest node ids, each of which must fail under the mutant


MUTANTS = [
    Mutant("cpu segmentation: a capacity-merge tie merges the newest pair", dla.ops.segment.cpu, "_capacity_merge",
           "i = dens.argmin(-1, keepdim=True)", "i = dens.shape[-1] - 1 - dens.flip(-1).argmin(-1, keepdim=True)",
           (f"{EDGES}::test_a_tie_between_two_pairs_merges_the_oldest[token-cpu]",
            f"{EDGES}::test_a_score_equal_to_tau_opens_and_zero_densities_tie_to_the_oldest_pair[0-state-cpu-none]",
            "tests/test_segment.py::test_segment_equals_segment_naive",
            "tests/test_ops.py::test_matches_the_reference")),
    Mutant("cpu segmentation (token, state): a score equal to τ does not open", dla.ops.segment.cpu._DlaScan, "chunk",
           "opens = info >= self.tau", "opens = info > self.tau",
           (f"{EDGES}::test_a_score_equal_to_tau_opens_and_zero_densities_tie_to_the_oldest_pair[0-token-cpu-none]",
            f"{EDGES}::test_a_score_equal_to_tau_two_opens[0-state-cpu-g]",
            "tests/test_segment.py::test_segment_equals_segment_naive",
            "tests/test_ops.py::test_matches_the_reference")),
    Mutant("drift detection: a score equal to τ does not open", dla.ops.segment.detect, "drift_scores",
           "flag=(info >= tau) | first", "flag=(info > tau) | first",
           (f"{EDGES}::test_a_score_equal_to_tau_opens_and_zero_densities_tie_to_the_oldest_pair[3-drift-cpu-beta]",
            "tests/test_segment.py::test_segment_equals_segment_naive",
            "tests/test_ops.py::test_matches_the_reference")),
    Mutant("drift detection on CUDA: a score equal to τ does not open", dla.ops.segment.detect_triton,
           "_scores_kernel", "(info >= tau) | first", "(info > tau) | first",
           (f"{EDGES}::test_a_score_equal_to_tau_two_opens[0-drift-triton-both]",
            "tests/test_triton_segment.py::test_drift_matches_naive[none]")),
    Mutant("triton segmentation: a capacity-merge tie merges the newest pair", dla.ops.segment.triton_walk,
           "_merge_kernel", "tie_break_left=True", "tie_break_left=False",
           (f"{EDGES}::test_a_tie_between_two_pairs_merges_the_oldest[state-triton]",
            "tests/test_triton_segment.py::test_capacity_merge_ties_pick_the_oldest_pair[3]",
            "tests/test_triton_segment.py::test_dla_matches_naive")),
    Mutant("triton walk: a score equal to τ does not open", dla.ops.segment.triton_walk, "_walk_range",
           "later & (info >= tau)", "later & (info > tau)",
           (f"{EDGES}::test_a_score_equal_to_tau_opens_and_zero_densities_tie_to_the_oldest_pair[0-token-triton-none]",
            f"{EDGES}::test_a_score_equal_to_tau_two_opens[3-token-triton-both]",
            "tests/test_triton_segment.py::test_dla_matches_naive")),
    Mutant("readout with β, backward: the queries' decay dropped", dla.ops.readout.chunked, "_chunk_backward",
           "dq += gam[..., None] * dQh", "dq += dQh",
           ("tests/test_readout.py::test_backward_matches_reference_autograd",
            "tests/test_readout.py::test_backward_gradcheck[dla-both]")),
    Mutant("readout with β on CUDA, backward: the band pass halves a key chunk's dγ_C",
           dla.ops.readout.objects_delta_triton, "_readout_bwd_band_kernel",
           "dgc_p += tl.sum(dx * x_in.to(tl.float32), axis=1)",
           "dgc_p += 0.5 * tl.sum(dx * x_in.to(tl.float32), axis=1)",
           ("tests/test_readout_delta_objects.py::test_triton_backward_matches_torch",)),
    Mutant("readout with β on CUDA, backward: the band steps the query back through a block without its decay",
           dla.ops.readout.objects_delta_triton, "_readout_bwd_band_kernel",
           "x_lo = gam_Ch * x_in.to(tl.float32) - mmr(", "x_lo = x_in.to(tl.float32) - mmr(",
           ("tests/test_readout_delta_objects.py::test_triton_backward_key_blocks_match_torch[2]",)),
    Mutant("readout with β on CUDA, backward: the dQ̂ buffer a row short per chunk (an overrun on a GPU)",
           dla.ops.readout.objects_delta_triton, "objects_delta_backward_triton",
           "DQH = torch.empty(N, NC, C, Dk,", "DQH = torch.empty(N, NC, C - 1, Dk,",
           ("tests/test_testing.py::test_the_operators_kernels_stay_in_bounds[dla-beta]",)),
    Mutant("readout with β on CUDA: a chunk pair's level span one level short",
           dla.ops.readout.objects_delta_triton, "_level_span",
           "tl.minimum(r1, L - 1) - r0 + 1, 0)", "tl.minimum(r1, L - 1) - r0, 0)",
           ("tests/test_readout_delta_objects.py::test_triton_forward_matches_torch",)),
    Mutant("readout with β on CUDA, backward: the band's level span from the chain pass one level short",
           dla.ops.readout.objects_delta_triton, "_readout_bwd_band_kernel",
           "tl.minimum(tl.load(at + C).to(tl.int32), L - 1) - r0 + 1, 0)",
           "tl.minimum(tl.load(at + C).to(tl.int32), L - 1) - r0, 0)",
           ("tests/test_readout_delta_objects.py::test_triton_backward_bfloat16_keeps_the_torch_paths_accuracy",)),
    Mutant("readout with β on CUDA, backward: a query's last band step reads only its span of dλ",
           dla.ops.readout.objects_delta_triton, "_readout_bwd_band_kernel",
           "(lc[None, :] < r0[:, None] + m)) | last)", "(lc[None, :] < r0[:, None] + m)))",
           ("tests/test_readout_delta_objects.py::test_triton_backward_bfloat16_keeps_the_torch_paths_accuracy",)),
    Mutant("readout with β on CUDA, backward: a chunk's first element adds its dK̃ to an unwritten buffer",
           dla.ops.readout.objects_delta_triton, "_object_bwd_kernel",
           "mask=(rk[:, None] < DK) & seen, other=0.0)", "mask=rk[:, None] < DK, other=0.0)",
           ("tests/test_readout_delta_objects.py::test_triton_backward_bfloat16_keeps_the_torch_paths_accuracy",)),
    Mutant("readout with β on CUDA, bfloat16: the masters between windows lose their rounding residuals",
           dla.ops.readout.objects_delta_triton, "_object_kernel",
           "acc += tl.load(res_src + r * D + tile,", "acc += 0.0 * tl.load(res_src + r * D + tile,",
           ("tests/test_readout_delta_objects.py::test_triton_forward_bfloat16_keeps_the_torch_paths_accuracy",)),
    Mutant("split bfloat16 products (readout with β, delta rule WY forward): the float32 side's lo halves dropped",
           dla.ops.triton_utils, "hilo",
           "return hi, (x - hi.to(tl.float32)).to(tl.bfloat16)", "return hi, (0.0 * x).to(tl.bfloat16)",
           ("tests/test_readout_delta_objects.py::test_triton_forward_bfloat16_keeps_the_torch_paths_accuracy",
            "tests/test_readout_delta_objects.py::test_triton_backward_bfloat16_keeps_the_torch_paths_accuracy",
            "tests/test_backbone_delta.py::test_wy_forward_bfloat16_products_keep_the_float32_results[16-True]",
            "tests/test_backbone_delta.py::test_wy_forward_bfloat16_products_keep_the_float32_results[64-False]")),
    Mutant("readout without β, backward: the final state's decay dropped", dla.ops.readout.objects,
           "objects_backward", "(decay[..., None, None] * dSc)[valid]", "dSc[valid]",
           ("tests/test_readout.py::test_backward_matches_reference_autograd",
            "tests/test_readout.py::test_backward_gradcheck[dla-g]")),
    Mutant("operator: the initial slots reach the readout oldest first", dla.operator, "_attend",
           "S0 = state.S if fresh else reverse_live_slots(state.S, state.m)", "S0 = state.S",
           ("tests/test_ops.py::test_continues_from_an_initial_state",)),
    Mutant("object plan: each chunk reads the partition of the row before its start", dla.ops.readout.plan,
           "build_plan", "row = cs.clamp(max=T - 1)", "row = (cs - 1).clamp(min=0, max=T - 1)",
           ("tests/test_readout_plan.py::test_plan_matches_the_level_map",)),
    Mutant("object readout: an object decays from its first token, not its last", dla.ops.readout.objects,
           "_read_terms", "Ge = _G_at(call.G, p.last[:, c])", "Ge = _G_at(call.G, p.first[:, c])",
           ("tests/test_readout.py::test_forward_matches_materialized",
            "tests/test_readout.py::test_backward_matches_reference_autograd")),
    Mutant("SSD backbone: the carried state survives a reset", dla.ops.backbone.ssd, "_chunks",
           "decay = (torch.exp(last) * (seg_last == 0))[..., 0]", "decay = torch.exp(last)[..., 0]",
           ("tests/test_backbone_ssd.py::test_torch_kernel_matches_recurrent",
            "tests/test_backbone_ssd.py::test_stage_pieces_match_recurrent")),
    Mutant("checkpoint: `latest` written in place", dla.run.checkpoint, "publish",
           'pointer = root / f".{LATEST}.tmp"', "pointer = root / LATEST",
           ("tests/test_train.py::test_crash_mid_write_keeps_the_previous_checkpoint[pointer]",)),
    Mutant("checkpoint: `latest` written before the rename", dla.run.checkpoint, "publish",
           "    os.replace(tmp, final)\n    pointer = root / f\".{LATEST}.tmp\"\n"
           "    pointer.write_text(name + \"\\n\")\n    _fsync(pointer)\n    os.replace(pointer, root / LATEST)\n",
           "    pointer = root / f\".{LATEST}.tmp\"\n    pointer.write_text(name + \"\\n\")\n    _fsync(pointer)\n"
           "    os.replace(pointer, root / LATEST)\n    os.replace(tmp, final)\n",
           ("tests/test_train.py::test_crash_mid_write_keeps_the_previous_checkpoint[rename]",)),
]


def mutated(mutant: Mutant):
    """The attribute rebuilt from its source with `old` replaced by `new`, in a copy of its
    module's namespace (the function's own, under decorators such as `torch.no_grad`). The
    edited source is registered with `linecache`, so that `inspect` (which Triton's jit and
    interpreter read) finds it."""
    original = inspect.getattr_static(mutant.owner, mutant.attribute)
    fn = inspect.unwrap(getattr(original, "fn", original))  # a Triton kernel wraps its Python function
    source = textwrap.dedent(inspect.getsource(fn))
    assert source.count(mutant.old) == 1, f"{mutant.name}: the edit matches the source of {fn.__qualname__} " \
                                          f"{source.count(mutant.old)} times, not once"
    source = source.replace(mutant.old, mutant.new)
    filename = f"<mutant of {fn.__module__}.{fn.__qualname__}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = dict(fn.__globals__)
    exec(compile(source, filename, "exec"), namespace)
    return namespace[fn.__name__]


def install(mutant: Mutant, monkeypatch) -> None:
    """Put the mutant in place of the attribute, and of every other name bound to the same
    object in a loaded module (`from m import f` copies the binding: `dla.multistate_attention`,
    a kernel module's `build_plan`, a test module's imports), so that what the checks call does
    not depend on which modules the run imported first."""
    original = inspect.getattr_static(mutant.owner, mutant.attribute)
    replacement = mutated(mutant)
    monkeypatch.setattr(mutant.owner, mutant.attribute, replacement)
    for module in list(sys.modules.values()):
        names = getattr(module, "__dict__", {})
        for name in [name for name, value in list(names.items()) if value is original]:
            monkeypatch.setattr(module, name, replacement)


class _Outcomes:
    """A pytest plugin recording each test's outcome in the nested run, in which a property test
    stops at its first failing example: the question is only whether a killer fails, so its
    remaining explicit examples (Hypothesis runs them all, to report every distinct bug) and the
    shrinking of a generated failure are wasted work. Hypothesis reads a test's settings from the
    attribute its `@settings` decorator writes, when the test runs."""

    def __init__(self, monkeypatch):
        self.monkeypatch = monkeypatch
        self.failed: set[str] = set()
        self.passed: set[str] = set()

    def pytest_collection_modifyitems(self, items):
        for test in {id(item.obj): item.obj for item in items if hasattr(item, "obj")}.values():
            # through decorators above `@given` (functools.wraps copies the attributes, not the object)
            while getattr(getattr(test, "__wrapped__", None), "is_hypothesis_test", False):
                test = test.__wrapped__
            if getattr(test, "is_hypothesis_test", False):
                first_failure = settings(test._hypothesis_internal_use_settings, report_multiple_bugs=False,
                                         phases=[Phase.explicit, Phase.reuse, Phase.generate])
                self.monkeypatch.setattr(test, "_hypothesis_internal_use_settings", first_failure)

    def pytest_runtest_logreport(self, report):
        if report.failed:
            self.failed.add(report.nodeid)
        elif report.when == "call" and report.passed:
            self.passed.add(report.nodeid)


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_the_checks_kill_the_mutant(mutant: Mutant, monkeypatch):
    install(mutant, monkeypatch)
    outcomes = _Outcomes(monkeypatch)
    pytest.main(["-q", "-p", "no:cacheprovider", "--no-header", "-W", "ignore", *mutant.killers], plugins=[outcomes])
    ran = outcomes.failed | outcomes.passed
    assert ran == set(mutant.killers), f"ran {sorted(ran)}, asked for {sorted(mutant.killers)}"
    assert not outcomes.passed, f"{mutant.name}: the mutant survived {sorted(outcomes.passed)}"
