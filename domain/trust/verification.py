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

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from domain.errors import ServiceError
from domain.trust import signing
from models import smoothing
from models.modes import Claim, Mismatch, Mode, RunSpec, by_family, get_mode
from models.modes.base import ABS_TOL, REL_TOL
from models.modes.base import same as _same

SCHEMAS = (2,)
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
            if get_mode(c.get("mode")).has_radius:  # a valid certificate's mode is known
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

    Uses the core's formulas through the certificate's mode (``models.modes``, which call
    ``models.smoothing``): CERTIFY's one-sided Clopper-Pearson bound and radius
    sigma * Phi^-1(pA_lower) (Cohen et al. 2019), the top-2 variant with Bonferroni bounds,
    PREDICT's binomial test, DECIDE's confidence sequence, and the cap
    sigma * Phi^-1(alpha^(1/n))."""
    c = _integral(dict(c))
    found = _mode_and_bound(c)
    if isinstance(found, str):
        return found
    mode, bound = found
    claim = _claim(c, mode, bound)
    if isinstance(claim, str):
        return claim
    try:
        out = mode.recompute(claim)
    except Mismatch as exc:
        return str(exc)
    return _compare(c, out, claim) or _check_cap(c, mode, claim)


def _mode_and_bound(c: Mapping[str, Any]) -> tuple[Mode, str] | str:
    """The certificate's registered mode and the bound it names, or why it cannot be checked."""
    try:
        mode = get_mode(c.get("mode"))
    except ValueError:
        known = ", ".join(m.name for m in by_family())
        return f"cannot recompute mode {c.get('mode')!r}: this verifier knows {known}"
    bound = c.get("bound") or smoothing.CLOPPER_PEARSON
    known_bounds = (smoothing.CLOPPER_PEARSON, smoothing.SEQUENCE)
    if bound not in known_bounds:
        return f"cannot recompute bound {bound!r}: this verifier knows {', '.join(known_bounds)}"
    return mode, str(bound)


def _claim(c: Mapping[str, Any], mode: Mode, bound: str) -> Claim | str:
    """The certificate's counts and parameters, checked for type and range, or the first
    reason they are unusable (counts, sigma/alpha/n/n0, n_used, samples_total, bound, class)."""
    counts, n0 = c.get("counts"), c.get("n0")
    n: Any = c.get("n")  # any JSON value until the core's checks pass
    sigma: Any = c.get("sigma")
    alpha: Any = c.get("alpha")
    if not isinstance(counts, list) or not counts or not all(_whole(k) for k in counts):
        return "counts must be a non-empty list of whole numbers"
    if any(k < 0 for k in counts):
        return "counts must not be negative"
    try:
        mode.validate(sigma, alpha, n, n0)  # any JSON values: the core checks them
    except ValueError as exc:
        return f"invalid parameters: {exc}"
    assert isinstance(n, int) and isinstance(sigma, int | float) and isinstance(alpha, int | float)
    used = c.get("n_used", n)
    if not _whole(used) or not 1 <= used <= n:
        return f"n_used {used!r} must be a whole number in [1, n={n}]"
    if sum(counts) != used:
        return f"the counts add up to {sum(counts)}, not n_used={used}"
    total = c.get("samples_total")
    selection = int(n0) if mode.uses_n0 and isinstance(n0, int) else 0
    if total is not None and total != selection + used:
        return f"samples_total {total!r} is not n0 + n_used = {selection + used}"
    if (bound == smoothing.SEQUENCE) != mode.sequential(used, n):
        return f"bound {bound!r} does not fit a run of {used} of n={n} samples in mode {mode.name}"
    selected = _selected(c, counts) if mode.uses_n0 else None
    if isinstance(selected, str):
        return selected
    return Claim(c, counts, selected, used, n, float(sigma), float(alpha), bound)


def _selected(c: Mapping[str, Any], counts: list[int]) -> int | str:
    """The class the selection chose: the prediction, or for an abstention a class whose count
    is ``count_a`` (classes with equal counts give the same bounds); else the reason."""
    c_a = c.get("prediction")
    if c_a is None:
        with_count_a = [i for i, k in enumerate(counts) if k == c.get("count_a")]
        if not with_count_a:
            return f"count_a {c.get('count_a')!r} does not follow from the counts: no class has it"
        c_a = with_count_a[0]
    if not _whole(c_a) or not 0 <= c_a < len(counts):
        return f"prediction {c_a!r} is not a class index of the counts"
    return int(c_a)


def _compare(c: Mapping[str, Any], out: smoothing.Outcome, claim: Claim) -> str | None:
    """The first claimed statistic that differs from the recomputed ``out``, or None."""
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
    for name, value in (
        ("pa_lower", out.pa_lower),
        ("pb_upper", out.pb_upper),
        ("pvalue", out.pvalue),
        ("radius", out.radius),
    ):
        if not _same(c.get(name), value):
            return (
                f"{name} {c.get(name)!r} does not follow from the counts, n={claim.n}, "
                f"alpha={c.get('alpha')} and sigma={c.get('sigma')} (they give {value!r})"
            )
    return None


def _check_cap(c: Mapping[str, Any], mode: Mode, claim: Claim) -> str | None:
    """None when ``max_radius`` is the mode's cap and the radius does not exceed it."""
    cap = mode.max_radius(claim)
    if not _same(c.get("max_radius"), cap):
        return f"max_radius {c.get('max_radius')!r} is not the cap for n={claim.n} (it is {cap!r})"
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
    try:
        mode = get_mode(c.get("mode"))
    except ValueError:
        raise ValueError(f"cannot replay mode {c.get('mode')!r}") from None
    run = mode.run(sampler, decoded.tensor, RunSpec.of_certificate(c))
    return compare(dict(c), run.to_dict(), str(where))
