"""``dmae-certify verify``: check a certificate offline (signature, statistics, image, replay).

Exit status: 0 valid (one line ``valid: ...``), 1 invalid (one line ``invalid: <the first
reason>``), 2 when the check could not be made (bad usage, unreadable files, no keys).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

USAGE_ERROR = 2


def register(sub: Any) -> None:
    v = sub.add_parser(
        "verify",
        help="check a certificate: signature, statistics from its counts, image, replay",
        description="Check a certificate (or a job as GET /jobs/{id} returns it) without trusting "
        "whoever handed it over: its Ed25519 signature, pA's bound, the radius and max_radius "
        "recomputed from the counts, and with --image that the image is the certified input. "
        "Exit 0 valid, 1 invalid (the first reason), 2 the check could not be made.",
    )
    v.add_argument("certificate", metavar="CERT.json", help="certificate or job JSON file")
    v.add_argument("--image", default=None, help="the certified image file")
    keys = v.add_mutually_exclusive_group()
    keys.add_argument(
        "--key",
        default=None,
        metavar="PUB",
        help="public key file: PEM, or the JSON of GET /keys (default: the public keys under "
        "DMAE_DATA_DIR/signing/public when present)",
    )
    keys.add_argument(
        "--server", default=None, metavar="URL", help="fetch the public keys from URL/keys"
    )
    v.add_argument(
        "--replay",
        action="store_true",
        help="also re-run the certificate's run on the image with its seed and compare the "
        "counts (needs --image; counts are reproducible per kind of device)",
    )
    v.add_argument(
        "--checkpoint",
        default=None,
        metavar="PATH_OR_NAME",
        help="the model to replay with (default: the certificate's model, if it is bundled)",
    )
    v.add_argument(
        "--device",
        default="auto",
        help="where to replay: auto (the certificate's kind of device when this machine has "
        "it, else cpu), cpu, cuda or cuda:N",
    )
    v.add_argument("--batch", type=int, default=1000, help="noisy copies per forward pass")
    v.set_defaults(func=run)


class UsageError(Exception):
    """The check cannot be made (exit 2)."""


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc


def _public_keys(args: argparse.Namespace) -> dict[str, Any]:
    from domain.trust import signing

    try:
        if args.key:
            return signing.load_public_keys(_read(args.key, "the public key"))
        if args.server:
            import httpx

            url = args.server.rstrip("/") + "/keys"
            try:
                answer = httpx.get(url, timeout=30, follow_redirects=True)
            except httpx.HTTPError as exc:
                raise UsageError(f"cannot fetch the public keys from {url}: {exc}") from exc
            if answer.status_code != 200:
                raise UsageError(f"{url} answered {answer.status_code}, not the public keys")
            return signing.load_public_keys(answer.text)
        from domain.config import Settings

        folder = Settings().signing_dir / signing.PUBLIC_DIR
        found: dict[str, Any] = {}
        for pem in sorted(folder.glob("*.pem")):
            found.update(signing.load_public_keys(pem.read_text()))
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if not found:
        raise UsageError(f"no public key: give --key PUB or --server URL (none under {folder})")
    return found


def _device(args: argparse.Namespace, cert: dict[str, Any]) -> str:
    if args.device != "auto":
        return str(args.device)
    import torch

    kind = str(cert.get("device", "cpu")).split(":", 1)[0]
    return "cuda" if kind == "cuda" and torch.cuda.is_available() else "cpu"


def _replay(args: argparse.Namespace, cert: dict[str, Any], image: bytes) -> tuple[bool, str]:
    from domain.trust.verification import replay
    from models.checkpoints import bundled_models

    checkpoint = args.checkpoint or str(cert.get("model", ""))
    if args.checkpoint is None and checkpoint not in bundled_models():
        raise UsageError(
            f"the certificate's model {checkpoint!r} is not a bundled model: give --checkpoint"
        )
    if args.batch < 1:
        raise UsageError("--batch must be at least 1")
    found = replay(cert, image, checkpoint, device=_device(args, cert), batch_size=args.batch)
    where = f"replayed on {found['device']}, certified on {found['original_device']}"
    if found["identical"]:
        return True, f"replay: counts identical ({where})"
    why = f"replay: counts differ in classes {found['differing_classes']} ({where})"
    if not found["same_device_kind"]:
        why += "; counts are reproducible per kind of device only (bf16 on CUDA, fp32 on CPU)"
    elif not found["differing_classes"]:
        why = f"replay: the n0 selection chose another class ({where})"
    return False, why


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except UsageError as exc:
        print(f"dmae-certify verify: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except Exception as exc:  # never a traceback: a one-line reason instead
        print(f"dmae-certify verify: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return USAGE_ERROR


def _run(args: argparse.Namespace) -> int:
    from domain.trust.verification import VerificationError, certificate_of, verify_certificate

    if args.replay and not args.image:
        raise UsageError("--replay needs --image (the certified image)")
    if args.checkpoint and not args.replay:
        raise UsageError("--checkpoint is used only with --replay")
    raw = _read(args.certificate, "the certificate")
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"{args.certificate} is not JSON: {exc}") from exc
    try:
        cert = certificate_of(document)
    except VerificationError as exc:
        raise UsageError(f"{args.certificate}: {exc}") from exc
    image = _read(args.image, "the image") if args.image else None
    verdict = verify_certificate(cert, public_keys=_public_keys(args), image_bytes=image)
    if not verdict.valid or not args.replay:
        print(verdict.line())
        return 0 if verdict.valid else 1
    assert image is not None
    try:
        same, said = _replay(args, cert, image)
    except ValueError as exc:
        print(f"invalid: replay: {exc}")
        return 1
    print(f"{verdict.line()}; {said}" if same else f"invalid: {said}")
    return 0 if same else 1
