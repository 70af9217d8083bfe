"""The lens-artefact audit (lens_kernel.audit) against the plain float64 reference.

Each case plants token directions in random residuals so that every detector fires somewhere:
a prompt that copies three prompt tokens in a row and then answers, one whose answer the norm
reveals but the raw lens does not, a control with a foil, one with masked and repeated echo
tokens and no answer, and one whose strong gate moves when the logits are scaled.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
from dataclasses import dataclass, fields
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import lens_kernel.lens as lens_module
from lens_kernel import (
    AuditRows,
    AuditRule,
    LensInputs,
    LensOutputs,
    NormSpec,
    PromptAudit,
    UnembedSpec,
    build_norm_plan,
    lens_pass,
)

from . import reference64 as ref
from .test_reference import Case, _norm_pair, count_matmuls

RTOL = 1e-5
ATOL = 1e-6  # probabilities, bits, cosines
DIFF_ATOL = 1e-5  # differences of float32 quantities of size ~10 (logits, entropies)

HOT = 10.0  # logit a planted direction gives its token (times the normalised component)
NOISE = 0.3
QUIET = 0.02  # every lens norm's scale on the decoy's direction: the norm all but removes it
C0, C1, C2, ANS, FOIL, DECOY = 3, 4, 5, 7, 8, 9
DIM = {C0: 0, C1: 1, C2: 2, ANS: 3, FOIL: 4, DECOY: 5}  # the residual direction of each token
WEAK_GAP = 0.48  # strong under logits x 1.1 (0.528 >= 0.5), not at x 1.0


@dataclass(frozen=True)
class AuditCase:
    name: str
    mode: str
    norm_kind: str = "layernorm"
    offset: float = 0.0
    softcap: float | None = None
    unembed_bias: bool = False
    keep_bias: bool = True
    vocab: int = 97
    top_k: int = 5
    head_temperature: float | None = None  # head logits = final / T + noise; None: the final
    echo: bool = True  # pass echo_ids (some masked); False: the kernel's default, prompt_ids
    seed: int = 0


CASES = [
    AuditCase("final-ln", "final", unembed_bias=True, seed=1),
    AuditCase("final-ln-dropbias-hot-head", "final", keep_bias=False, head_temperature=1.5, seed=2),
    AuditCase("final-rms-gemma", "final", norm_kind="rmsnorm", offset=1.0, top_k=2, seed=3),
    AuditCase("final-rms-cap3", "final", norm_kind="rmsnorm", softcap=3.0, echo=False, seed=4),
    AuditCase("next-ln-cool-head", "next_ln1", vocab=300, top_k=60, head_temperature=0.7, seed=5),
    AuditCase("next-rms-cap30", "next_ln1", norm_kind="rmsnorm", softcap=30.0, vocab=40, seed=6),
    AuditCase("raw-bias", "raw", unembed_bias=True, vocab=300, head_temperature=0.8, seed=7),
]


@dataclass
class Built:
    kernel_plan: list
    ref_plan: list
    final_kernel: NormSpec
    final_ref: ref.RefNorm
    unembed: UnembedSpec
    ref_unembed: ref.RefUnembed
    resid_next: torch.Tensor  # [layers, B, d]
    prompt_ids: torch.Tensor  # [B, T] -1 padded
    echo_ids: torch.Tensor | None  # [B, T]
    answer_ids: torch.Tensor  # [B]
    foil_ids: torch.Tensor  # [B]
    head_logits: torch.Tensor | None  # [B, V]

    @property
    def echo_for_ref(self) -> list:
        return (self.prompt_ids if self.echo_ids is None else self.echo_ids).tolist()


def _quiet_norm(case: AuditCase, g: torch.Generator, d: int, eps: float):
    """A random norm of the case's kind whose scale on the decoy's direction is QUIET."""
    spec, ref_norm = _norm_pair(
        Case(case.name, case.mode, norm_kind=case.norm_kind, offset=case.offset), g, d, eps
    )
    spec.weight[DIM[DECOY]] = QUIET - case.offset
    ref_norm.weight[DIM[DECOY]] = QUIET - case.offset
    return spec, ref_norm


def _tune_gap(b: Built, layer: int, prompt: int, target: float, keep_bias: bool) -> None:
    """Add the answer direction to one residual until the reference's answer logit gap is
    ``target`` (bisection: the gap grows with the answer's share of the normalised vector)."""
    x0 = b.resid_next[layer, prompt].double().numpy()
    d = x0.shape[0]

    def gap(a: float) -> float:
        x = x0.copy()
        x[DIM[ANS]] += a * math.sqrt(d)
        z = ref.unembed(ref.apply_norm(x, b.ref_plan[layer], keep_bias), b.ref_unembed)
        return ref.logit_gap(ref.log_softmax(z), ANS)

    lo, hi = -4.0, 4.0
    assert gap(lo) < target < gap(hi)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if gap(mid) < target else (lo, mid)
    b.resid_next[layer, prompt, DIM[ANS]] += float(lo * math.sqrt(d))


@functools.cache
def build(case: AuditCase) -> Built:
    """Seeded random model pieces and next-token residuals with planted token directions."""
    rnd = random.Random(case.seed)
    g = torch.Generator().manual_seed(case.seed)
    vocab, d, n_blocks, batch = case.vocab, 16, 6, 5
    layers = n_blocks + 1
    final_k, final_r = _quiet_norm(case, g, d, 1e-5)
    ln1 = [_quiet_norm(case, g, d, 1e-6) for _ in range(n_blocks)]
    kernel_plan = build_norm_plan(case.mode, n_blocks, final_k, [k for k, _ in ln1])
    ref_plan = ref.norm_plan(case.mode, n_blocks, final_r, [r for _, r in ln1])

    # Each planted token reads one basis direction; the rest of the vocabulary is random.
    W_U = torch.randn(d, vocab, generator=g) / math.sqrt(d)
    W_U[:, list(DIM)] = 0.0
    for token, dim in DIM.items():
        W_U[dim, token] = HOT / math.sqrt(d)
    b_U = 0.3 * torch.randn(vocab, generator=g) if case.unembed_bias else None
    unembed = UnembedSpec(W_U, b_U, case.softcap)
    ref_unembed = ref.RefUnembed(
        W_U.double().numpy(), None if b_U is None else b_U.double().numpy(), case.softcap
    )

    resid = NOISE * torch.randn(layers, batch, d, generator=g)  # [layers, B, d]

    def plant(prompt: int, at: slice | int, token: int, coef: float = 1.0) -> None:
        resid[at, prompt, DIM[token]] += coef * math.sqrt(d)

    def filler(n: int) -> list[int]:
        return [rnd.randrange(12, vocab) for _ in range(n)]

    prompt_ids = torch.tensor(
        [
            # 0: copies C0 C1 C2 (consecutive in its prompt) at layers 1-3, then answers.
            [*filler(2), C0, C1, C2, *filler(3)],
            # 1: the norm reveals the answer at layers 1-3 (the raw lens sees the decoy).
            [-1, -1, *filler(6)],
            # 2: a control: the foil first, then the answer.
            [*filler(7), -1],
            # 3: no answer; C1 twice in a row and a masked C2 (see echo_ids).
            [-1, C1, C1, C2, filler(1)[0], C0, *filler(2)],
            # 4: the answer's gap is tuned below the strong gate at layers 2-3.
            filler(8),
        ]
    )
    echo_ids = prompt_ids.clone()
    echo_ids[3, 3] = -1  # C2 is not an eligible echo here (say, punctuation)
    echo_ids[4, :3] = -1  # a prompt with a masked head
    plant(0, 1, C0)
    plant(0, 2, C1)
    plant(0, 3, C2)
    plant(0, slice(4, None), ANS)
    plant(1, slice(1, 4), ANS, 0.6)
    plant(1, slice(1, 4), DECOY, 1.0)
    plant(1, slice(4, None), ANS)
    plant(2, slice(1, 3), FOIL)
    plant(2, 3, FOIL, 0.5)
    plant(2, slice(3, None), ANS)
    plant(3, slice(2, 4), C1)
    plant(3, 4, C2)
    plant(3, 5, C0)
    plant(4, slice(4, None), ANS)
    answer_ids = torch.tensor([ANS, ANS, ANS, -1, ANS])
    foil_ids = torch.tensor([-1, -1, FOIL, -1, FOIL])
    built = Built(
        kernel_plan, ref_plan, final_k, final_r, unembed, ref_unembed, resid, prompt_ids,
        echo_ids if case.echo else None, answer_ids, foil_ids, None,
    )  # fmt: skip
    for layer in (2, 3):
        _tune_gap(built, layer, 4, WEAK_GAP, case.keep_bias)

    if case.head_temperature is not None:
        final = [
            ref.unembed(ref.apply_norm(x, final_r, True), ref_unembed)
            for x in resid[-1].double().numpy()
        ]
        noise = 0.2 * torch.randn(batch, vocab, generator=g).double().numpy()
        built.head_logits = torch.tensor(np.array(final) / case.head_temperature + noise).float()
    return built


def run_kernel(case: AuditCase, audit: AuditRule | None = None, **kwargs) -> LensOutputs:
    b = build(case)
    inputs = LensInputs(
        b.resid_next, b.prompt_ids, b.answer_ids, foil_ids=b.foil_ids, echo_ids=b.echo_ids
    )
    return lens_pass(
        inputs, b.kernel_plan, b.unembed, case.top_k, keep_bias=case.keep_bias,
        final_norm=b.final_kernel, audit=audit, head_logits=b.head_logits, **kwargs,
    )  # fmt: skip


@functools.cache
def reference(case: AuditCase) -> tuple[dict, dict]:
    b = build(case)
    return ref.audit(
        b.resid_next.double().numpy(),
        b.ref_plan,
        b.ref_unembed,
        b.answer_ids.tolist(),
        b.echo_for_ref,
        b.foil_ids.tolist(),
        None if b.head_logits is None else b.head_logits.double().numpy(),
        case.keep_bias,
        final=b.final_ref,
    )


DIFF_FIELDS = {"answer_logit_gap", "entropy_gap_bits", "kl_norm_raw_bits", "kl_norm_raw_max_bits"}
TEMPERATURE_FIELDS = {"last_temperature", "last_kl_after_temperature_bits"}


def _assert_field(name: str, got: torch.Tensor, expected: np.ndarray) -> None:
    assert got.shape == expected.shape, name
    if got.dtype == torch.bool:
        np.testing.assert_array_equal(got.numpy(), expected.astype(bool), err_msg=name)
    elif not got.dtype.is_floating_point:
        np.testing.assert_array_equal(got.numpy(), expected.astype(np.int64), err_msg=name)
    else:
        atol = DIFF_ATOL if name in DIFF_FIELDS else ATOL
        np.testing.assert_allclose(got.numpy(), expected, RTOL, atol, err_msg=name)


def assert_audit_matches(case: AuditCase, out: LensOutputs) -> None:
    """Every field of out.audit and out.prompt_audit against the reference."""
    rows, prompts = reference(case)
    assert out.audit is not None and out.prompt_audit is not None
    for f in fields(AuditRows):
        if f.name not in TEMPERATURE_FIELDS:
            _assert_field(f.name, getattr(out.audit, f.name), rows[f.name])
    assert out.prompt_audit.confirmed_tuned is None  # no tuned lens in a lens pass of its own
    for f in fields(PromptAudit):
        if f.name != "confirmed_tuned":
            _assert_field(f.name, getattr(out.prompt_audit, f.name), prompts[f.name])
    # The temperature search: the kernel's KL at its s is the reference's minimum, and s close.
    kl_after = out.audit.last_kl_after_temperature_bits.double().numpy()
    np.testing.assert_allclose(kl_after, rows["last_kl_after_temperature_bits"], 1e-4, 1e-5)
    np.testing.assert_allclose(out.audit.last_temperature.numpy(), rows["last_temperature"], 1e-2)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_audit_matches_float64_reference(case: AuditCase) -> None:
    assert_audit_matches(case, run_kernel(case, AuditRule()))


def test_reference_rule_is_the_kernels_default() -> None:
    kernel = {f.name: getattr(AuditRule(), f.name) for f in fields(AuditRule)}
    assert kernel == dataclasses.asdict(ref.RefAuditRule())


def test_planted_flags_are_not_vacuous() -> None:
    """Across the cases each detector both fires and stays quiet, so the comparisons bite."""
    seen: dict[str, set] = {}

    def saw(name: str, values) -> None:
        seen.setdefault(name, set()).update(bool(v) for v in np.ravel(values))

    for case in CASES:
        rows, prompts = reference(case)
        strict, soft = prompts["L_copy_strict"], prompts["L_copy_soft"]
        saw("strict copy @0.95", strict[3] >= 0)
        saw("strict copy @0.7 before @0.95", (strict[0] >= 0) & (strict[0] < strict[3]))
        saw("soft copy k=2", soft[1] >= 0)
        saw("soft copy k=3", soft[2] >= 0)
        saw("norm-only semantics", prompts["n_norm_only_layers"] > 0)
        saw("strong gate", prompts["L_semantic_strong"] >= 0)
        saw("gate moves under scaling", ~prompts["gates_stable"].astype(bool))
        saw("control wins", prompts["L_control_wins"] >= 0)
        saw("answer over echo", prompts["L_answer_over_echo"] >= 0)
        saw("geometric crossover after layer 0", prompts["L_geom_crossover"] > 0)
        has_semantic = prompts["L_semantic_raw"] >= 0
        saw("confirmed", prompts["L_semantic_confirmed"][has_semantic] >= 0)
        saw("temperature searched", rows["last_temperature"] != 1.0)
        saw("KL(norm || raw) >= 1 bit", prompts["frac_layers_kl_ge_1"] > 0)
        saw("jaccard < 1", prompts["jaccard_p50"] < 1)
        # Prompt 3's masked C2 confidently on top at layer 4: in its prompt, yet no copy.
        if case.echo and rows["top1"][4, 3] == C2 and rows["p1"][4, 3] > 0.95:
            saw("masked echo on top is no copy", not rows["copy_strict"][:, 4, 3].any())
    assert seen.pop("masked echo on top is no copy") == {True}
    assert all(values == {True, False} for values in seen.values()), seen


ONE_PROMPT_CASES = [
    c for c in CASES if c.name in ("final-rms-gemma", "next-ln-cool-head", "raw-bias")
]


@pytest.mark.parametrize("case", ONE_PROMPT_CASES, ids=[c.name for c in ONE_PROMPT_CASES])
def test_one_prompt_chunks_give_the_same_audit(case: AuditCase, monkeypatch) -> None:
    """chunk_bytes too small for one row: one matmul per prompt (its rows, normed and raw)."""
    b = build(case)
    whole = run_kernel(case, AuditRule())
    calls = count_matmuls(monkeypatch)
    one = run_kernel(case, AuditRule(), chunk_bytes=1)
    layers, batch = b.resid_next.shape[:2]
    assert calls == [batch] + [2 * layers] * batch  # the reference rows, then each prompt
    assert_audit_matches(case, one)
    for f in fields(AuditRows):
        got, expected = getattr(one.audit, f.name), getattr(whole.audit, f.name)
        if f.name == "cos_to_final":  # a bmm over fewer prompts rounds differently: ulps
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
        else:
            assert torch.equal(got.nan_to_num(), expected.nan_to_num()), f.name
    for f in fields(PromptAudit):
        got, expected = getattr(one.prompt_audit, f.name), getattr(whole.prompt_audit, f.name)
        if got is None and expected is None:
            continue
        assert torch.equal(got.nan_to_num(), expected.nan_to_num()), f.name


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_audit_leaves_the_lens_bit_identical(case: AuditCase) -> None:
    """audit=None vs an audit, also where the audit halves the chunks (2 prompts -> 1)."""
    b = build(case)
    layers = b.resid_next.shape[0]
    for chunk_bytes in (lens_module.DEFAULT_CHUNK_BYTES, 2 * layers * 4 * b.unembed.d_vocab):
        plain = run_kernel(case, None, chunk_bytes=chunk_bytes)
        audited = run_kernel(case, AuditRule(), chunk_bytes=chunk_bytes)
        assert plain.audit is None and plain.prompt_audit is None
        assert torch.equal(plain.final_logits, audited.final_logits)
        for part in ("next", "next.rows", "collapse"):
            a, c = plain, audited
            for attr in part.split("."):
                a, c = getattr(a, attr), getattr(c, attr)
            for f in fields(a):
                x, y = getattr(a, f.name), getattr(c, f.name)
                if isinstance(x, torch.Tensor):
                    assert torch.equal(x.nan_to_num(), y.nan_to_num()), (part, f.name)
                    assert torch.equal(x.isnan(), y.isnan()), (part, f.name)


def test_nonfinite_rows_are_counted() -> None:
    """An infinite residual and one that overflows float32 in the norm are flagged per layer."""
    case = CASES[0]
    b = build(case)
    resid = b.resid_next.clone()
    resid[3, 1, 0] = math.inf
    resid[2, 2, :2] = 3e38  # finite, but its float32 variance is not
    inputs = LensInputs(resid, b.prompt_ids, b.answer_ids, foil_ids=b.foil_ids, echo_ids=b.echo_ids)
    out = lens_pass(
        inputs, b.kernel_plan, b.unembed, case.top_k, final_norm=b.final_kernel, audit=AuditRule()
    )
    expected = torch.zeros_like(out.audit.nonfinite)
    expected[3, 1] = expected[2, 2] = True
    assert torch.equal(out.audit.nonfinite, expected)
    assert torch.equal(out.audit.nonfinite_logits, expected)
    assert out.prompt_audit.n_nonfinite_layers.tolist() == [0, 1, 1, 0, 0]
    # The ratio into the infinite residual is inf; the per-prompt maximum reports it as the
    # largest float32 (nan_to_num's default for +inf), which the records keep as a number.
    assert math.isinf(float(out.audit.resid_norm_ratio[3, 1]))
    assert float(out.prompt_audit.max_resid_norm_ratio[1]) >= torch.finfo(torch.float32).max


def test_cos_to_final_of_underflowing_logits_stays_in_range() -> None:
    """Regression (found by test_audit_ranges): final logits of ~1e-38 square to zero in the
    norms but not in the dot product, and cos_to_final came out as 4."""
    resid = torch.tensor([[[1.0, 1.1755e-38]], [[1.1755e-38, 1.1755e-38]]])  # [layers, B, d]
    inputs = LensInputs(resid, torch.tensor([[0]]), torch.tensor([0]))
    out = lens_pass(inputs, [None, None], UnembedSpec(torch.ones(2, 2)), 2, audit=AuditRule())
    cos = out.audit.cos_to_final
    assert ((cos >= -1) & (cos <= 1)).all(), cos
    assert float(cos[0, 0]) == 1.0  # parallel logits [1, 1] and [2e-38, 2e-38]


def test_top_k_one_with_an_audit_is_refused() -> None:
    """The strict copy rule needs p2: an audited lens pass refuses top_k = 1 in words (the
    manifest allows top_k >= 2 only, so only a direct kernel call can ask for it)."""
    case = CASES[0]
    b = build(case)
    inputs = LensInputs(b.resid_next, b.prompt_ids, b.answer_ids)
    with pytest.raises(ValueError, match="top_k must be >= 2"):
        lens_pass(inputs, b.kernel_plan, b.unembed, 1, final_norm=b.final_kernel, audit=AuditRule())


# Properties over random batches: ranges, and the orderings the definitions imply.

SETTINGS = settings(max_examples=100, deadline=None, derandomize=True)
SLACK = 1e-5  # float32 sums of probabilities may overshoot a bound by a few ulps


def _f32(lo: float, hi: float):
    return st.floats(lo, hi, width=32)


@st.composite
def audit_batches(draw, identity_plan: bool = False):
    """Random (inputs, plan, unembed, top_k, rule, head_logits).

    identity_plan: no norm anywhere, no softcap, and W_U and the residuals from a seeded normal.
    The lens ranks by log_softmax, the raw lens by x - logsumexp; those round differently, so
    logits within an ulp of each other (repeated values, which hypothesis likes, or a saturated
    softcap) can tie in one and not in the other: the identity holds for generic logits.
    """
    layers, batch = draw(st.integers(1, 5)), draw(st.integers(1, 3))
    d, vocab, seq = draw(st.integers(2, 8)), draw(st.integers(2, 70)), draw(st.integers(1, 6))
    if identity_plan:
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
        W_U = (2.0 * torch.randn(d, vocab, generator=g)).numpy()
        resid = (2.0 * torch.randn(layers, batch, d, generator=g)).numpy()
    else:
        W_U = draw(hnp.arrays(np.float32, (d, vocab), elements=_f32(-3, 3)))
        resid = draw(hnp.arrays(np.float32, (layers, batch, d), elements=_f32(-4, 4)))
    prompt = draw(hnp.arrays(np.int64, (batch, seq), elements=st.integers(-1, vocab - 1)))
    masked = draw(
        hnp.arrays(np.bool_, (batch, seq), elements=st.sampled_from([False] * 3 + [True]))
    )
    answers = draw(hnp.arrays(np.int64, (batch,), elements=st.integers(-1, vocab - 1)))
    foils = draw(hnp.arrays(np.int64, (batch,), elements=st.integers(-1, vocab - 1)))
    if draw(st.booleans()):
        # Make the detectors fire more often: answers and prompt tokens taken from the raw
        # top-1 ids (a proxy for the lens's), the prompt in layer order (chains for soft copy),
        # and maybe one residual, scaled up, at every layer (gates held at consecutive layers).
        if draw(st.booleans()):
            resid[:] = 2.0 * resid[draw(st.integers(0, layers - 1))]
        top1 = (resid @ W_U).argmax(axis=-1)  # [layers, B]
        answers = top1[draw(st.integers(0, layers - 1))].astype(np.int64)
        n = min(seq, layers)
        prompt[:, :n] = top1[layers - n :].T
    plan: list[NormSpec | None] = []
    for _ in range(layers):
        kind = None if identity_plan else draw(st.sampled_from([None, "rmsnorm", "layernorm"]))
        if kind is None:
            plan.append(None)
            continue
        weight = torch.from_numpy(draw(hnp.arrays(np.float32, (d,), elements=_f32(-1, 2))))
        bias = 0.5 * weight.flip(0) if kind == "layernorm" else None
        plan.append(NormSpec(kind, weight, bias, 1e-5))
    b_U = draw(st.one_of(st.none(), hnp.arrays(np.float32, (vocab,), elements=_f32(-1, 1))))
    unembed = UnembedSpec(
        torch.from_numpy(W_U),
        None if b_U is None else torch.from_numpy(b_U),
        None if identity_plan else draw(st.sampled_from([None, 3.0])),
    )
    head = draw(st.one_of(st.none(), hnp.arrays(np.float32, (batch, vocab), elements=_f32(-8, 8))))
    echo = None if draw(st.booleans()) else torch.from_numpy(np.where(masked, -1, prompt))
    inputs = LensInputs(
        torch.from_numpy(resid),
        torch.from_numpy(prompt),
        torch.from_numpy(answers),
        foil_ids=torch.from_numpy(foils),
        echo_ids=echo,
    )
    rule = AuditRule(jaccard_k=draw(st.sampled_from([5, 50])))
    head_logits = None if head is None else torch.from_numpy(head)
    return inputs, plan, unembed, draw(st.integers(2, 6)), rule, head_logits


def _run(batch) -> LensOutputs:
    inputs, plan, unembed, top_k, rule, head_logits = batch
    return lens_pass(inputs, plan, unembed, top_k, audit=rule, head_logits=head_logits)


def _within(t: torch.Tensor, lo: float, hi: float, nan_ok: bool = False) -> bool:
    ok = (t >= lo - SLACK) & (t <= hi + SLACK)
    return bool((ok | t.isnan()).all() if nan_ok else ok.all())


def _first_layers_ordered(first: torch.Tensor) -> bool:
    """[milestones, B] first layers of ever stricter conditions: each reached no earlier than
    the one before it, and only if that one was reached."""
    earlier, later = first[:-1], first[1:]
    return bool(((later < 0) | ((earlier >= 0) & (earlier <= later))).all())


def _implies(stricter: torch.Tensor, looser: torch.Tensor) -> bool:
    return bool((~stricter | looser).all())


@SETTINGS
@given(batch=audit_batches())
def test_audit_ranges(batch) -> None:
    out = _run(batch)
    a, pa = out.audit, out.prompt_audit
    vocab = batch[2].d_vocab
    assert (a.kl_norm_raw_bits >= 0).all()
    assert _within(a.js_norm_raw_bits, 0, 1)
    assert _within(a.l1_norm_raw, 0, 2)
    assert _within(a.jaccard_top_raw_norm, 0, 1)
    assert _within(a.echo_mass, 0, 1) and _within(a.top_prompt_share, 0, 1)
    assert _within(a.p_top5, 0, 1)
    assert _within(a.entropy_raw_bits, 0, math.log2(vocab))
    assert _within(a.cos_to_final, -1, 1)
    assert _within(a.cos_resid_answer, -1, 1, nan_ok=True)
    assert _within(a.cos_resid_prompt_max, -1, 1, nan_ok=True)
    assert _within(a.answer_prob_scaled, 0, 1, nan_ok=True)
    assert _within(a.last_temperature, 0.1, 10.0)
    assert (a.last_kl_after_temperature_bits <= a.last_kl_to_head_bits).all()
    assert ((pa.lens_artefact_score >= 0) & (pa.lens_artefact_score <= 1)).all()
    assert _within(pa.frac_layers_kl_ge_1, 0, 1) and _within(pa.frac_layers_kl_ge_half, 0, 1)
    assert (pa.frac_layers_kl_ge_1 <= pa.frac_layers_kl_ge_half).all()


@SETTINGS
@given(batch=audit_batches())
def test_audit_orderings(batch) -> None:
    out = _run(batch)
    a, pa = out.audit, out.prompt_audit
    # Strict copy at 0.95 => 0.9 => 0.8 => 0.7; soft copy k=3 => k=2 => k=1, layer by layer.
    for stricter, looser in zip(a.copy_strict.flip(0)[:-1], a.copy_strict.flip(0)[1:], strict=True):
        assert _implies(stricter, looser)
    for stricter, looser in zip(a.copy_soft.flip(0)[:-1], a.copy_soft.flip(0)[1:], strict=True):
        assert _implies(stricter, looser)
    assert _first_layers_ordered(pa.L_copy_strict)  # thresholds 0.7 < 0.8 < 0.9 < 0.95
    assert _first_layers_ordered(pa.L_copy_soft)  # windows 1 < 2 < 3
    assert _first_layers_ordered(pa.L_rank)  # rank <= 10, <= 5, <= 1
    assert _first_layers_ordered(pa.L_kl)  # KL <= 1.0, <= 0.5 bit
    assert _first_layers_ordered(pa.L_cos)  # cos >= 0.2, 0.4, 0.6
    # Strong implies margin implies rank 1 under the lens.
    assert _implies(a.semantic_strong, a.semantic_margin_ok)
    assert _implies(a.semantic_margin_ok, out.next.answer_rank == 1)
    assert _first_layers_ordered(torch.stack([pa.L_semantic_margin, pa.L_semantic_strong]))
    # The gates read rank 1, L_semantic reads top-1: the same thing unless the answer ties for
    # the top (then topk may put the other token first), so the order holds on untied prompts.
    top = out.next.rows.top_probs
    untied = top[..., 0] > top[..., 1]
    assert _implies(a.semantic_margin_ok & untied, out.next.is_answer)
    l_sem = out.collapse.L_semantic
    both = (l_sem >= 0) & (pa.L_semantic_margin >= 0) & untied.all(dim=0)
    assert (pa.L_semantic_margin[both] >= l_sem[both]).all()
    assert ((pa.L_semantic_confirmed == -1) | (pa.L_semantic_confirmed == l_sem)).all()
    # Norm-only semantics: rank 1 under the lens only, never at the last layer.
    assert not a.norm_only_semantics[-1].any()
    assert _implies(a.norm_only_semantics, a.answer_rank_raw != 1)


@SETTINGS
@given(batch=audit_batches(identity_plan=True))
def test_raw_lens_equals_an_unnormalised_lens(batch) -> None:
    """With no norm anywhere the raw decode is the lens: no divergence, the same top sets."""
    out = _run(batch)
    a = out.audit
    # The two decodes agree bit for bit; their log-probs (log_softmax, x - logsumexp) within
    # a few ulps of the largest logit, so KL and JS are that small, not 0.
    inputs, _, unembed, *_ = batch
    z_max = float(unembed(inputs.resid_next).abs().max())
    tol = 1e-6 + 4 * torch.finfo(torch.float32).eps * z_max / math.log(2)
    assert (a.kl_norm_raw_bits <= tol).all() and (a.js_norm_raw_bits <= tol).all()
    assert (a.l1_norm_raw <= 1e-5).all()
    assert (a.entropy_gap_bits.abs() <= 1e-5).all()
    assert (a.jaccard_top_raw_norm == 1).all()
    assert not a.norm_only_semantics.any()
    assert torch.equal(a.answer_rank_raw, out.next.answer_rank)
    assert (out.prompt_audit.n_norm_only_layers == 0).all()


def test_the_tuned_lens_confirms_l_semantic_within_the_window_as_the_raw_lens_does() -> None:
    from lens_kernel.audit import confirm_with_tuned, confirmed_by

    # 6 layers, 5 prompts: L_semantic 2, 2, 3, never, 5 (the last layer); raw rank 1 only for
    # prompt 0 (layer 4).
    l_sem = torch.tensor([2, 2, 3, -1, 5])
    raw_rank1 = torch.zeros(6, 5, dtype=torch.bool)
    raw_rank1[4, 0] = True
    tuned_rank = torch.full((6, 5), 7)
    tuned_rank[1, 0] = 1  # prompt 0: raw and tuned
    tuned_rank[0, 1] = 1  # prompt 1: tuned, 2 layers before L_semantic: inside the window
    tuned_rank[0, 2] = 1  # prompt 2: tuned, 3 before: outside
    tuned_rank[:, 3] = 1  # prompt 3: no L_semantic, nothing to confirm
    tuned_rank[5, 4] = 1  # prompt 4: only at the last layer, where tuned is the final lens
    raw = confirmed_by(l_sem, raw_rank1, 2)
    assert raw.tolist() == [True, False, False, False, False]
    audit = SimpleNamespace(confirmed_raw=raw, confirmed_tuned=None, L_semantic_confirmed=None)
    answers = torch.tensor([5, 5, 5, 5, 5])
    confirm_with_tuned(audit, l_sem, tuned_rank, answers, 2)  # type: ignore[arg-type]
    assert audit.confirmed_tuned.tolist() == [True, True, False, False, False]
    assert audit.L_semantic_confirmed.tolist() == [2, 2, -1, -1, -1]
    tuned_rank[4, 4] = 1  # ... and one layer before it: confirmed
    confirm_with_tuned(audit, l_sem, tuned_rank, answers, 2)  # type: ignore[arg-type]
    assert audit.L_semantic_confirmed.tolist() == [2, 2, -1, -1, 5]
    # No answer: never confirmed, whatever the ranks say.
    confirm_with_tuned(audit, l_sem, tuned_rank, -answers, 2)  # type: ignore[arg-type]
    assert audit.confirmed_tuned.tolist() == [False] * 5


@pytest.mark.parametrize("case", CASES[:3], ids=[c.name for c in CASES[:3]])
def test_raw_decode_stays_float32_under_a_bfloat16_lens(case: AuditCase) -> None:
    """unembed_precision = "bfloat16" speeds the lens rows only: the audit's raw rows are still
    decoded in float32 (bf16 would move the raw ranks), so every raw-only figure is the float32
    run's and matches the float64 reference."""
    b = build(case)
    fast = dataclasses.replace(b.unembed, precision="bfloat16")
    inputs = LensInputs(
        b.resid_next, b.prompt_ids, b.answer_ids, foil_ids=b.foil_ids, echo_ids=b.echo_ids
    )
    out = lens_pass(
        inputs, b.kernel_plan, fast, case.top_k, keep_bias=case.keep_bias,
        final_norm=b.final_kernel, audit=AuditRule(), head_logits=b.head_logits,
    )  # fmt: skip
    exact = run_kernel(case, AuditRule())
    for name in ("answer_rank_raw", "top1_id_raw"):
        assert torch.equal(getattr(out.audit, name), getattr(exact.audit, name)), name
    for name in ("entropy_raw_bits", "answer_prob_raw"):
        torch.testing.assert_close(
            getattr(out.audit, name), getattr(exact.audit, name), rtol=1e-6, atol=1e-7,
            equal_nan=True,
        )  # fmt: skip
    torch.testing.assert_close(out.final_logits, exact.final_logits, rtol=0, atol=0)
