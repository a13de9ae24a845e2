"""Offline verification (domain.trust.verification): the statistics recomputed from the counts agree
with formulas written here independently of the core, the image check, and the teeth:

- a tampered certificate whose radius is consistent with tampered counts fails on its signature;
- a body whose radius does not follow from its counts fails on the statistics even when it is
  signed (with a test key): the signature proves who issued it, not that the numbers are right;
- a verifier fed certificates from a deliberately wrong bound (two-sided instead of one-sided)
  rejects them, so the recomputation really checks the formula.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from typing import Any

import numpy as np
import pytest
from conftest import KnownClassifierFactory
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from PIL import Image
from scipy.stats import beta, binomtest, norm
from service_support import digit_png
from statsmodels.stats.proportion import proportion_confint

from domain.trust.signing import Signer
from domain.trust.verification import certificate_of, check_statistics, verify_certificate
from models.images import preprocess_image, tensor_sha256
from models.smoothing import BatchSampler, certify, predict

SIGNER = Signer.of(Ed25519PrivateKey.generate())
KEYS = {SIGNER.key_id: SIGNER.public_key}
SIGMA, ALPHA = 0.5, 0.001


def stamped(body: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A core certificate with the fields the service adds, signed with the test key."""
    return SIGNER.sign({**body, "model": "m", "label": "x", "schema": 2, **extra})


def reference(counts: list[int], c_a: int, n: int, mode: str, alpha: float = ALPHA) -> dict:
    """The statistics of a run, from the textbook formulas (statsmodels / SciPy), not the core:
    CERTIFY's one-sided Clopper-Pearson bound is statsmodels' two-sided interval at 2 alpha."""
    body: dict[str, Any] = dict(
        mode=mode, counts=counts, n=n, n0=100, alpha=alpha, sigma=SIGMA, pvalue=None
    )
    if mode == "predict":
        order = sorted(range(len(counts)), key=lambda i: -counts[i])
        k1, k2 = counts[order[0]], counts[order[1]]
        p = binomtest(k1, k1 + k2, 0.5).pvalue if k1 + k2 else 1.0
        ok = p <= alpha
        body.update(
            n0=0, pvalue=float(p), pa_lower=None, pb_upper=None, radius=0.0, count_a=k1,
            count_b=k2, prediction=order[0] if ok else None, abstained=not ok,
            abstain_reason=None if ok else "top_two_not_significant",
            max_radius=max(0.0, SIGMA * norm.ppf(alpha ** (1 / n))),
        )  # fmt: skip
        return body
    k = counts[c_a]
    if mode == "certify":
        pa = proportion_confint(k, n, alpha=2 * alpha, method="beta")[0] if k else 0.0
        ok = pa >= 0.5
        radius = SIGMA * norm.ppf(pa) if ok else 0.0
        pb, count_b, why = None, None, "pa_lower_below_half"
        cap = max(0.0, SIGMA * norm.ppf(alpha ** (1 / n)))
    else:
        pa = beta.ppf(alpha / 2, k, n - k + 1) if k else 0.0
        level = alpha / (2 * (len(counts) - 1))
        others = [i for i in range(len(counts)) if i != c_a]
        ups = [beta.ppf(1 - level, counts[i] + 1, n - counts[i]) if counts[i] < n else 1.0
               for i in others]  # fmt: skip
        pb = min(max(ups), 1 - pa)
        radius = SIGMA / 2 * (norm.ppf(pa) - norm.ppf(pb)) if pa > 0 else 0.0
        ok = pa > pb and radius > 0
        radius = radius if ok else 0.0
        count_b, why = max(counts[i] for i in others), "pa_lower_not_above_pb_upper"
        cap = max(0.0, SIGMA * norm.ppf((alpha / 2) ** (1 / n)))
    body.update(
        pa_lower=float(pa), pb_upper=None if pb is None else float(pb), radius=float(radius),
        count_a=k, count_b=count_b, prediction=c_a if ok else None, abstained=not ok,
        abstain_reason=None if ok else why, max_radius=float(cap),
    )  # fmt: skip
    return body


def random_runs(mode: str, trials: int, seed: int) -> list[tuple[list[int], int, int]]:
    """(counts, selected class, n): pA from 0.3 to 1, 3 to 10 classes, n from 20 to 100,000."""
    rng = np.random.default_rng(seed)
    runs = []
    for _ in range(trials):
        classes = int(rng.integers(3, 11))
        n = int(np.exp(rng.uniform(math.log(20), math.log(100_000))))
        pa = float(rng.uniform(0.3, 1.0))
        rest = rng.dirichlet(np.ones(classes - 1)) * (1 - pa)
        counts = [int(c) for c in rng.multinomial(n, [pa, *rest])]
        runs.append((counts, 0, n))
    return runs


@pytest.mark.parametrize("mode", ["certify", "certify_top2", "predict"])
def test_recomputation_agrees_with_the_textbook_formulas(mode: str) -> None:
    runs = random_runs(mode, 300, seed={"certify": 1, "certify_top2": 2, "predict": 3}[mode])
    outcomes = set()
    for counts, c_a, n in runs:
        body = reference(counts, c_a, n, mode)
        verdict = verify_certificate(stamped(body), public_keys=KEYS)
        assert verdict.valid, (verdict.reason, counts, n)
        outcomes.add(body["abstained"])
    assert outcomes == {True, False}  # both answers were exercised


def test_a_deliberately_wrong_bound_is_caught() -> None:
    """Certificates whose pA bound is two-sided at alpha (half the one-sided level: a classic
    slip) with a radius consistent with it, signed: every one with hits is refused."""
    runs = random_runs("certify", 200, seed=4)
    refused = 0
    for counts, c_a, n in runs:
        wrong = reference(counts, c_a, n, "certify")
        right_pa = wrong["pa_lower"]
        slip = proportion_confint(counts[c_a], n, alpha=ALPHA, method="beta")[0]
        wrong["pa_lower"] = float(slip)
        if not wrong["abstained"] and slip >= 0.5:
            wrong["radius"] = float(SIGMA * norm.ppf(slip))
        verdict = verify_certificate(stamped(wrong), public_keys=KEYS)
        assert not verdict.valid and "pa_lower" in (verdict.reason or ""), (counts, right_pa)
        refused += 1
    assert refused == len(runs)


def test_core_certificates_verify_and_altered_ones_do_not(
    known_classifier: KnownClassifierFactory,
) -> None:
    """Certificates of the real core (CERTIFY, top-2, PREDICT; certified and abstaining)."""
    seen = set()
    for probs in ([0.9, 0.06, 0.04], [0.5, 0.45, 0.05]):
        model, x = known_classifier(probs, SIGMA)
        sampler = BatchSampler(model, len(probs), 500)
        for seed in range(4):
            made = [
                certify(sampler, x, SIGMA, 50, 400, ALPHA, seed),
                certify(sampler, x, SIGMA, 50, 400, ALPHA, seed, top2=True),
                predict(sampler, x, SIGMA, 400, ALPHA, seed),
            ]
            for run in made:
                cert = stamped(run.to_dict())
                seen.add((run.mode, run.abstained))
                assert verify_certificate(cert, public_keys=KEYS).valid, cert
                bigger = SIGNER.sign({**cert, "radius": cert["radius"] + 1e-6})
                assert "radius" in (verify_certificate(bigger, public_keys=KEYS).reason or "")
                moved = list(cert["counts"])
                moved[0], moved[1] = moved[0] - 1, moved[1] + 1  # class 0: always chosen
                shifted = SIGNER.sign({**cert, "counts": moved})
                reason = verify_certificate(shifted, public_keys=KEYS).reason or ""
                assert "does not follow from the counts" in reason, (run.mode, reason)
    assert len(seen) >= 5  # every mode, both certified and abstaining ones


def test_consistent_tampering_fails_on_the_signature_and_signed_nonsense_on_the_counts() -> None:
    counts = [9000, 600, 400]
    honest = stamped(reference(counts, 0, 10_000, "certify"))
    assert verify_certificate(honest, public_keys=KEYS).valid
    # A forger raises the counts and the radius consistently, without the key.
    better = reference([9900, 60, 40], 0, 10_000, "certify")
    forged = {**honest, **{k: better[k] for k in ("counts", "count_a", "pa_lower", "radius")}}
    assert check_statistics(forged) is None  # the numbers hang together ...
    reason = verify_certificate(forged, public_keys=KEYS).reason or ""
    assert "altered after signing" in reason  # ... but the service never signed them
    # A body signed by the key holder whose radius does not follow from its counts.
    inflated = SIGNER.sign({**honest, "radius": better["radius"]})
    reason = verify_certificate(inflated, public_keys=KEYS).reason or ""
    assert reason.startswith("radius") and "does not follow from the counts" in reason
    capped = SIGNER.sign({**honest, "max_radius": honest["max_radius"] * 2})
    assert "max_radius" in (verify_certificate(capped, public_keys=KEYS).reason or "")


def test_unknown_modes_and_bounds_are_named() -> None:
    body = stamped({**reference([90, 5, 5], 0, 100, "certify"), "mode": "certify_top3"})
    assert verify_certificate(body, public_keys=KEYS).reason == (
        "cannot recompute mode 'certify_top3': this verifier knows certify, certify_top2, "
        "predict, decide"
    )
    other = stamped({**reference([90, 5, 5], 0, 100, "certify"), "bound": "betting-cs"})
    assert "cannot recompute bound 'betting-cs'" in (
        verify_certificate(other, public_keys=KEYS).reason or ""
    )
    odd = stamped(reference([90, 5, 5], 0, 100, "certify"), schema=9)
    assert "unknown certificate schema 9" in (
        verify_certificate(odd, public_keys=KEYS).reason or ""
    )
    short = stamped(reference([90, 5, 5], 0, 100, "certify"), n=101)
    assert "add up to 100, not n_used=101" in (
        verify_certificate(short, public_keys=KEYS).reason or ""
    )


def _png(arr: np.ndarray, **options: Any) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG", **options)
    return buf.getvalue()


def test_the_image_must_be_the_certified_input() -> None:
    data = digit_png(0)
    x = preprocess_image(Image.open(io.BytesIO(data)), 8).tensor
    body = reference([180, 15, 5], 0, 200, "certify")
    cert = stamped(
        body,
        input_shape=[3, 8, 8],
        tensor_sha256=tensor_sha256(x),
        input_sha256=hashlib.sha256(data).hexdigest(),
    )
    same = verify_certificate(cert, public_keys=KEYS, image_bytes=data)
    assert same.valid and same.image == "the certified file"
    recoded = _png(np.asarray(Image.open(io.BytesIO(data))), compress_level=0)
    assert recoded != data
    again = verify_certificate(cert, public_keys=KEYS, image_bytes=recoded)
    assert again.valid and "another file" in (again.image or "")
    other = verify_certificate(cert, public_keys=KEYS, image_bytes=digit_png(1))
    assert not other.valid and "not the certified input" in (other.reason or "")
    junk = verify_certificate(cert, public_keys=KEYS, image_bytes=b"not an image")
    assert not junk.valid and "cannot be used" in (junk.reason or "")
    assert "valid: m certify: predicts 'x' (class 0), radius " in same.line()


def test_a_job_document_gives_its_certificate() -> None:
    cert = stamped(reference([180, 15, 5], 0, 200, "certify"))
    job = json.loads(json.dumps({"id": "j", "status": "succeeded", "certificate": cert}))
    assert certificate_of(job) == cert
    with pytest.raises(ValueError, match="no certificate"):
        certificate_of({"id": "j", "status": "queued", "certificate": None})
    with pytest.raises(ValueError, match="not a certificate"):
        certificate_of({"hello": 1})


def test_verify_certificate_accepts_the_whole_job_as_the_cli_does() -> None:
    """docs/API.md's ``verify_certificate(cert, ...)`` given the job the README saves as
    job.json (GET /jobs/{id}) checks its certificate, as ``dmae-certify verify job.json``
    does; a job without one, or a document that is neither, is invalid and says so."""
    cert = stamped(reference([180, 15, 5], 0, 200, "certify"))
    job = json.loads(json.dumps({"id": "j", "status": "succeeded", "certificate": cert}))
    verdict = verify_certificate(job, public_keys=KEYS)
    assert verdict.valid, verdict.reason
    assert verdict.certificate == cert
    assert verdict.line() == verify_certificate(cert, public_keys=KEYS).line()
    edited = json.loads(json.dumps(job))
    edited["certificate"]["radius"] = 9.0
    assert not verify_certificate(edited, public_keys=KEYS).valid
    waiting = {"id": "j", "status": "queued", "certificate": None}
    queued = verify_certificate(waiting, public_keys=KEYS)
    assert not queued.valid
    assert queued.reason == "the job has no certificate (its status is 'queued')"
    neither = verify_certificate({"hello": 1}, public_keys=KEYS)
    assert not neither.valid and "not a certificate" in str(neither.reason)


def test_sequential_certificates_verify_and_their_decision_is_checked(
    known_classifier: KnownClassifierFactory,
) -> None:
    """DECIDE and a budget-stopped CERTIFY (bound: the confidence sequence at n_used) verify
    from their counts; a decision or a bound that does not follow is refused, signed or not."""
    from models.smoothing import decide

    for probs, target in (([0.995, 0.005], 0.5), ([0.6, 0.4], 0.5), ([0.9, 0.1], 0.25)):
        model, x = known_classifier(probs, SIGMA)
        sampler = BatchSampler(model, 2, 256)
        cert = decide(sampler, x, SIGMA, target, 50, 20_000, ALPHA, seed=11).to_dict()
        assert verify_certificate(stamped(cert), public_keys=KEYS).valid, cert["decision"]
        flipped = {"certified": "not_certified", "not_certified": "undecided"}
        other = {**cert, "decision": flipped.get(cert["decision"], "certified")}
        assert "decision" in (verify_certificate(stamped(other), public_keys=KEYS).reason or "")
    # A budget stop: the same counts re-run with stop_after, as a replay would.
    model, x = known_classifier([0.97, 0.03], SIGMA)
    sampler = BatchSampler(model, 2, 256)
    early = certify(sampler, x, SIGMA, 50, 10_000, ALPHA, seed=5, stop_after=700).to_dict()
    assert early["bound"] == "beta-binomial-mixture-cs" and early["n_used"] == 700
    assert verify_certificate(stamped(early), public_keys=KEYS).valid
    as_if_fixed = {**early, "bound": "clopper-pearson"}  # the narrower bound, not earned
    reason = verify_certificate(stamped(as_if_fixed), public_keys=KEYS).reason or ""
    assert "does not fit a run of 700 of n=10000" in reason


def test_decide_refuses_an_n_that_cannot_reach_the_target(
    known_classifier: KnownClassifierFactory,
) -> None:
    from models.smoothing import decide

    model, x = known_classifier([1.0, 0.0], 0.25)
    with pytest.raises(ValueError, match="needs n >= 351"):
        decide(BatchSampler(model, 2, 64), x, 0.25, 0.5, 20, 300, 0.001, seed=0)


def test_a_certificate_re_serialised_with_whole_floats_still_verifies() -> None:
    """RFC 8785 writes 500.0 as 500: a tool that re-serialises a certificate with floats keeps
    both the signature and the statistics valid."""
    honest = stamped(reference([9000, 600, 400], 0, 10_000, "certify"))
    assert verify_certificate(honest, public_keys=KEYS).valid
    floats = json.loads(json.dumps(honest), parse_int=float)
    assert isinstance(floats["n"], float) and isinstance(floats["counts"][0], float)
    verdict = verify_certificate(floats, public_keys=KEYS)
    assert verdict.valid, verdict.reason
    fractional = {**floats, "n": 10_000.5}
    assert not verify_certificate(fractional, public_keys=KEYS).valid
