"""Checking a certificate offline: no database, no server, no trust in whoever handed it over.

:func:`verify_certificate` checks, in order, and stops at the first failure:

1. the **signature** (``domain.trust.signing``): the certificate is exactly what the service issued;
2. the **statistics**: pA's bound, pB's bound (top-2), the p-value (predict), the prediction,
   the abstention and the radius recomputed from ``counts``, ``n``, ``alpha`` and ``sigma`` with
   the core's own functions (``models.smoothing.certify_outcome`` / ``predict_outcome`` /
   ``decide_outcome``, with the bound the certificate names: Clopper-Pearson, or the
   anytime-valid confidence sequence for a sequential decision or a budgeted stop), and
   ``max_radius``; so even a body signed with a stolen or test key cannot claim a radius its
   counts do not give;
3. with the image: the **input**: the image is converted exactly as the service converts
   uploads (``domain.intake.images.decode_image``, i.e. ``models.images.preprocess_image`` at the
   certificate's input size) and the sha256 of the float32 tensor must be ``tensor_sha256``.
   ``input_sha256`` (the file's bytes) is compared too: the same pixels in another file are the
   same input and still valid (the verdict says so).

What it cannot check: the n0 selection samples are not in the certificate (the selected class
is taken as given; a replay re-draws them), and that the counts came from the model on that
input rather than being typed in: the signature vouches for that, and :func:`replay` re-runs
the model with the certificate's seed (counts are reproducible per kind of device only).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from scipy.stats import norm

from domain.errors import ServiceError
from domain.trust import signing
from models import smoothing

SCHEMAS = (2,)
MODES = ("certify", "certify_top2", "predict", "decide")
REL_TOL, ABS_TOL = 1e-9, 1e-12  # recomputed floats agree to the last few bits across SciPy builds
MAX_IMAGE_PIXELS = 40_000_000  # the service's default DMAE_MAX_IMAGE_PIXELS


class VerificationError(ValueError):
    """A document that is not a certificate at all (usage error, not an invalid certificate)."""


@dataclass
class Verdict:
    """The outcome: ``valid``, or the first ``reason`` it is not."""

    valid: bool
    certificate: dict[str, Any]
    reason: str | None = None
    image: str | None = None  # what the image check found, when an image was given
    checks: list[str] = field(default_factory=list)  # what passed, in order

    def line(self) -> str:
        """One line for people: ``valid: ...`` (the radius rounded down) or ``invalid: ...``."""
        if not self.valid:
            return f"invalid: {self.reason}"
        from models.evaluate import round_down

        c = self.certificate
        if c.get("abstained"):
            answer = f"abstains ({c.get('abstain_reason')})"
        else:
            answer = f"predicts {c.get('label')!r} (class {c.get('prediction')})"
            if c.get("mode") != "predict":
                answer += f", radius {round_down(float(c['radius']))} (rounded down)"
        parts = [
            f"{c.get('model')} {c.get('mode')}: {answer}",
            f"sigma={c.get('sigma')} n={c.get('n')} alpha={c.get('alpha')}",
            f"max_radius {round_down(float(c['max_radius']))}",
            f"seed {c.get('seed_source')}",
            f"prior_runs {c.get('prior_runs')}",
            f"key {c.get('key_id')}",
        ]
        if self.image:
            parts.append(f"image: {self.image}")
        return "valid: " + "; ".join(parts)


def certificate_of(document: Any) -> dict[str, Any]:
    """The certificate in ``document``: a certificate, or a job as ``GET /jobs/{id}`` answers it.

    Raises :class:`VerificationError` when it is neither, or a job without a certificate."""
    if not isinstance(document, Mapping):
        raise VerificationError("expected a JSON object (a certificate or a job)")
    if "certificate" in document and "status" in document:
        cert = document["certificate"]
        if not isinstance(cert, Mapping):
            status = document.get("status")
            raise VerificationError(f"the job has no certificate (its status is {status!r})")
        return dict(cert)
    if "counts" not in document or "mode" not in document:
        raise VerificationError("not a certificate: it has no 'mode' and 'counts'")
    return dict(document)


def verify_certificate(
    cert: Mapping[str, Any],
    *,
    public_keys: Mapping[str, Ed25519PublicKey],
    image_bytes: bytes | None = None,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
) -> Verdict:
    """Check ``cert``: a certificate dict (as ``GET /jobs/{id}`` shows it under
    ``certificate``), or the whole job as ``GET /jobs/{id}`` answers it (its certificate is
    checked, as ``dmae-certify verify`` does; see :func:`certificate_of`).

    ``public_keys``: key id -> Ed25519 public key (``domain.trust.signing.load_public_keys`` reads
    PEM or the JSON of ``GET /keys``). ``image_bytes``: the uploaded file, to check the input.
    Returns a :class:`Verdict`; never raises for a bad certificate (a job without a
    certificate, or a document that is neither, is invalid with the reason)."""
    try:
        body = certificate_of(cert)
    except VerificationError as exc:
        return Verdict(False, dict(cert) if isinstance(cert, Mapping) else {}, reason=str(exc))
    verdict = Verdict(False, body)
    reason = signing.verify_signature(body, public_keys)
    if reason is not None:
        verdict.reason = reason
        return verdict
    verdict.checks.append(f"signature (key {body['key_id']})")
    if body.get("schema") not in SCHEMAS:
        verdict.reason = f"unknown certificate schema {body.get('schema')!r} (known: {SCHEMAS})"
        return verdict
    reason = check_statistics(body)
    if reason is not None:
        verdict.reason = reason
        return verdict
    verdict.checks.append("statistics recomputed from the counts")
    if image_bytes is not None:
        reason, verdict.image = check_image(body, image_bytes, max_image_pixels)
        if reason is not None:
            verdict.reason = reason
            return verdict
        verdict.checks.append("input")
    verdict.valid = True
    return verdict


def _same(claimed: Any, recomputed: float | int | None) -> bool:
    if recomputed is None or claimed is None:
        return claimed is None and recomputed is None
    if isinstance(claimed, bool) or not isinstance(claimed, numbers.Real):
        return False
    return math.isclose(float(claimed), float(recomputed), rel_tol=REL_TOL, abs_tol=ABS_TOL)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integral(value: Any) -> Any:
    """``value`` with every whole float (``500.0``) made an int, recursively: RFC 8785 writes
    both as ``500``, so a tool that re-serialises a certificate keeps its signature valid."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, list):
        return [_integral(v) for v in value]
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    return value


def check_statistics(c: Mapping[str, Any]) -> str | None:
    """None when every statistic in ``c`` follows from its counts; else the first mismatch.

    Uses the core's formulas (``models.smoothing``): CERTIFY's one-sided Clopper-Pearson bound
    and radius sigma * Phi^-1(pA_lower) (Cohen et al. 2019), the top-2 variant with Bonferroni
    bounds, PREDICT's binomial test, and the cap sigma * Phi^-1(alpha^(1/n))."""
    c = _integral(dict(c))
    mode = c.get("mode")
    if mode not in MODES:
        return f"cannot recompute mode {mode!r}: this verifier knows {', '.join(MODES)}"
    bound = c.get("bound") or smoothing.CLOPPER_PEARSON
    known = (smoothing.CLOPPER_PEARSON, smoothing.SEQUENCE)
    if bound not in known:
        return f"cannot recompute bound {bound!r}: this verifier knows {', '.join(known)}"
    counts, n0 = c.get("counts"), c.get("n0")
    n: Any = c.get("n")
    sigma: Any = c.get("sigma")
    alpha: Any = c.get("alpha")
    if not isinstance(counts, list) or not counts or not all(_whole(k) for k in counts):
        return "counts must be a non-empty list of whole numbers"
    if any(k < 0 for k in counts):
        return "counts must not be negative"
    try:
        smoothing.validate(
            sigma, alpha, n, n0 if mode != "predict" else None, n0_zero_ok=mode == "decide"
        )
    except ValueError as exc:
        return f"invalid parameters: {exc}"
    assert isinstance(n, int) and isinstance(sigma, int | float) and isinstance(alpha, int | float)
    used: Any = c.get("n_used", n)
    if not _whole(used) or not 1 <= used <= n:
        return f"n_used {used!r} must be a whole number in [1, n={n}]"
    if sum(counts) != used:
        return f"the counts add up to {sum(counts)}, not n_used={used}"
    total = c.get("samples_total")
    selection = int(n0) if mode != "predict" and isinstance(n0, int) else 0
    if total is not None and total != selection + used:
        return f"samples_total {total!r} is not n0 + n_used = {selection + used}"
    merged = mode == "decide" and n0 == 0
    sequential = mode == "decide" or used < n
    if (bound == smoothing.SEQUENCE) != sequential:
        return f"bound {bound!r} does not fit a run of {used} of n={n} samples in mode {mode}"
    top2 = mode == "certify_top2"
    if mode == "predict":
        out: Any = smoothing.predict_outcome(counts, alpha)
    else:
        c_a = c.get("prediction")
        if c_a is None:  # abstained: the selected class is one whose count is count_a
            with_count_a = [i for i, k in enumerate(counts) if k == c.get("count_a")]
            if not with_count_a:
                return (
                    f"count_a {c.get('count_a')!r} does not follow from the counts: no class has it"
                )
            c_a = with_count_a[0]  # classes with equal counts give the same bounds
        if not _whole(c_a) or not 0 <= c_a < len(counts):
            return f"prediction {c_a!r} is not a class index of the counts"
        if mode == "decide":
            target: Any = c.get("target_radius")
            hits: Any = c.get("predictable_hits")
            if merged and (not isinstance(hits, int) or isinstance(hits, bool)):
                return "a decide certificate with n0 = 0 needs predictable_hits (a whole number)"
            # merged (n0 = 0): class selection merged into the test, predictable_hits carries it
            said = "the counts and predictable_hits" if merged else "the counts"
            try:
                out = (
                    smoothing.merged_outcome(counts, hits, used, n, sigma, alpha, target)
                    if merged
                    else smoothing.decide_outcome(counts, c_a, used, n, sigma, alpha, target)
                )
            except ValueError as exc:
                return f"the decision does not follow from the counts: {exc}"
            if c.get("decision") != out.decision:
                return (
                    f"decision {c.get('decision')!r} does not follow from {said} "
                    f"(they give {out.decision!r})"
                )
            if not _same(c.get("pa_upper"), out.pa_upper):
                return f"pa_upper {c.get('pa_upper')!r} does not follow from the counts"
        else:
            lower, upper = smoothing.bounds(bound, used)
            out = smoothing.certify_outcome(
                counts, c_a, used, sigma, alpha, top2=top2, lower=lower, upper=upper
            )
    claims: list[tuple[str, Any, Any]] = [
        ("count_a", c.get("count_a"), out.count_a),
        ("count_b", c.get("count_b"), out.count_b),
        ("prediction", c.get("prediction"), out.prediction),
        ("abstained", c.get("abstained"), out.abstain_reason is not None),
        ("abstain_reason", c.get("abstain_reason"), out.abstain_reason),
    ]
    for name, claimed, recomputed in claims:
        if claimed != recomputed or type(claimed) is not type(recomputed):
            return f"{name} {claimed!r} does not follow from the counts (they give {recomputed!r})"
    for name, recomputed in (
        ("pa_lower", out.pa_lower),
        ("pb_upper", out.pb_upper),
        ("pvalue", out.pvalue),
        ("radius", out.radius),
    ):
        if not _same(c.get(name), recomputed):
            return (
                f"{name} {c.get(name)!r} does not follow from the counts, n={n}, alpha={alpha} "
                f"and sigma={sigma} (they give {recomputed!r})"
            )
    level = alpha / 2 if top2 else alpha
    if merged:
        cap = smoothing.merged_max_radius(sigma, n, alpha, len(counts))
    elif mode == "decide":
        cap = smoothing.decide_max_radius(sigma, n, alpha)
    elif used < n:  # a budgeted stop: the sequence's bound after used hits of used
        cap = max(0.0, sigma * float(norm.ppf(smoothing.bounds(bound, used)[0](used, level))))
    else:
        cap = smoothing.max_radius(sigma, n, level)
    if not _same(c.get("max_radius"), cap):
        return f"max_radius {c.get('max_radius')!r} is not the cap for n={n} (it is {cap!r})"
    if float(c["radius"]) > cap * (1 + REL_TOL) + ABS_TOL:
        return f"radius {c['radius']!r} exceeds max_radius {cap!r}"
    return None


def check_image(
    c: Mapping[str, Any], data: bytes, max_pixels: int = MAX_IMAGE_PIXELS
) -> tuple[str | None, str | None]:
    """(first reason the image is not the certified input or None, what was found).

    The image goes through the service's own upload conversion at the certificate's input
    size; its float32 tensor's sha256 must equal ``tensor_sha256``."""
    from domain.intake.images import decode_image

    shape = c.get("input_shape")
    want = c.get("tensor_sha256")
    if not (isinstance(shape, list) and len(shape) == 3 and all(_whole(s) for s in shape)):
        return "the certificate has no usable input_shape to convert the image to", None
    if not isinstance(want, str) or not want:
        return "the certificate records no tensor_sha256 to compare the image with", None
    try:
        decoded = decode_image(data, int(shape[-1]), max_pixels)
    except ServiceError as exc:
        return f"the image cannot be used: {exc.detail}", None
    if list(decoded.tensor.shape) != shape:
        return f"the image converts to shape {list(decoded.tensor.shape)}, not {shape}", None
    if decoded.tensor_sha256 != want:
        return (
            f"the image is not the certified input: its tensor sha256 is "
            f"{decoded.tensor_sha256[:16]}..., the certificate's {want[:16]}..."
        ), None
    if decoded.sha256 == c.get("input_sha256"):
        return None, "the certified file"
    return None, "the certified pixels, in another file (input_sha256 differs)"


def replay(
    c: Mapping[str, Any],
    data: bytes,
    checkpoint: str,
    *,
    device: str = "cpu",
    batch_size: int = 1000,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> dict[str, Any]:
    """Re-run the certificate's run: ``checkpoint`` (a file or bundled model name) on the image
    ``data`` with the certificate's mode, parameters and seed, on ``device``. Returns
    ``domain.trust.replay_compare.compare``'s record (``identical``, both counts, both devices).

    Raises ValueError when the checkpoint is not the certificate's model or the image cannot be
    converted. Counts are reproducible per kind of device: CUDA runs the network in bf16, the
    CPU in float32, so a CUDA certificate replayed on a CPU may differ."""
    from domain.intake.images import decode_image
    from domain.trust.replay_compare import compare
    from models.checkpoints import file_sha256, load_classifier_with_meta, resolve
    from models.runtime import autocast_dtype, pick_device

    model, meta = load_classifier_with_meta(checkpoint)
    same_file = file_sha256(resolve(checkpoint)) == c.get("checkpoint_sha256")
    if not same_file and meta.weights_sha256 != c.get("weights_sha256"):
        raise ValueError(
            f"{checkpoint} is not the certificate's model {c.get('model')!r}: neither its file "
            "sha256 nor its weights sha256 matches"
        )
    try:
        decoded = decode_image(data, meta.input_size, max_pixels)
    except ServiceError as exc:
        raise ValueError(f"the image cannot be used: {exc.detail}") from exc
    where = pick_device(device)
    model = model.to(where)
    sampler = smoothing.BatchSampler(
        model, meta.num_classes, batch_size, where, autocast_dtype(where)
    )
    x, seed = decoded.tensor, int(c["seed"])
    sigma, alpha, n = float(c["sigma"]), float(c["alpha"]), int(c["n"])
    if c.get("mode") == "predict":
        run = smoothing.predict(sampler, x, sigma, n, alpha, seed)
    elif c.get("mode") in ("certify", "certify_top2"):
        top2 = c["mode"] == "certify_top2"
        stop = c.get("n_used") if c.get("n_used") not in (None, n) else None
        run = smoothing.certify(
            sampler, x, sigma, int(c["n0"]), n, alpha, seed, top2=top2, stop_after=stop
        )
    elif c.get("mode") == "decide":
        target = float(c["target_radius"])
        run = smoothing.decide(sampler, x, sigma, target, int(c["n0"]), n, alpha, seed)
    else:
        raise ValueError(f"cannot replay mode {c.get('mode')!r}")
    return compare(dict(c), run.to_dict(), str(where))
