"""Signing keys, the canonical form and derived seeds (domain.trust.signing,
domain.services.submissions).

- The signed bytes are RFC 8785: keys sorted, no whitespace, ECMAScript numbers.
- A signature covers every other field: changing any one of them, nested ones included, breaks
  it; the key id names the key.
- Keys: generated once at first use with mode 0600 (concurrent first starts keep one), given by
  DMAE_SIGNING_KEY (missing: a clear error), rotated with the old public key still published.
- The derived seed is an HMAC under the server secret: it changes with the secret, and stays
  the same for the same secret and request.
"""

from __future__ import annotations

import base64
import json
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from service_support import service_settings

from domain.services.submissions import SEED_BITS, derive_seed
from domain.trust import signing

BODY: dict[str, Any] = {
    "mode": "certify",
    "prediction": 7,
    "radius": 0.6312345678901234,
    "pa_lower": 0.9942,
    "counts": [0, 2, 0, 1, 0, 0, 0, 9991, 3, 3],
    "n": 10000,
    "alpha": 0.001,
    "sigma": 0.25,
    "seed": 2**53 - 1,
    "label": "séven",
    "timings": {"run_s": 1e-7, "estimation_s": 1.5},
    "warnings": [],
    "pb_upper": None,
}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_canonical_form_is_rfc_8785() -> None:
    got = signing.canonical_bytes({"b": 1.0, "a": [1e-7, 0.1, 1e21], "é": "x", "signature": "s"})
    assert got == '{"a":[1e-7,0.1,1e+21],"b":1,"é":"x"}'.encode()  # RFC 8785 section 3.2.2.3
    with pytest.raises(ValueError, match="canonical JSON"):
        signing.canonical_bytes({"seed": 2**60})  # beyond I-JSON integers
    with pytest.raises(ValueError, match="canonical JSON"):
        signing.canonical_bytes({"radius": float("nan")})


def test_a_signature_covers_every_field_and_names_its_key() -> None:
    signer = signing.Signer.of(Ed25519PrivateKey.generate())
    keys = {signer.key_id: signer.public_key}
    signed = signer.sign(BODY)
    assert signed["key_id"] == signer.key_id and len(signer.key_id) == 16
    assert len(base64.b64decode(signed["signature"])) == 64
    assert signing.verify_signature(signed, keys) is None
    # The JSON round trip (storage, HTTP) keeps it valid: key order and number spelling are free.
    relaid = json.loads(json.dumps(dict(reversed(list(signed.items())))))
    assert signing.verify_signature(relaid, keys) is None

    def altered(path: list[Any], value: Any) -> dict[str, Any]:
        copy = json.loads(json.dumps(signed))
        node = copy
        for step in path[:-1]:
            node = node[step]
        node[path[-1]] = value
        return copy

    changes = [([k], "changed") for k in signed if k not in ("signature",)]
    changes += [
        (["counts", 7], 9990),
        (["timings", "run_s"], 2e-7),
        (["radius"], 0.6312345678901235),
    ]
    for path, value in changes:
        reason = signing.verify_signature(altered(path, value), keys)
        assert reason is not None, path
        if path != ["key_id"]:
            assert "altered after signing" in reason, (path, reason)
    extra = {**signed, "note": "added later"}
    assert "altered" in (signing.verify_signature(extra, keys) or "")
    other = signing.Signer.of(Ed25519PrivateKey.generate())
    assert "not among the given public keys" in (
        signing.verify_signature(signed, {other.key_id: other.public_key}) or ""
    )
    unsigned = {k: v for k, v in signed.items() if k != "signature"}
    assert "not signed" in (signing.verify_signature(unsigned, keys) or "")


def test_keys_are_made_once_with_private_modes(tmp_path: Path) -> None:
    settings = service_settings(tmp_path / "data", seed_secret_file="")  # the default file
    made: list[str] = []

    def first_start() -> None:
        made.append(signing.signer(settings).key_id)

    threads = [threading.Thread(target=first_start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(made)) == 1
    key = tmp_path / "data" / "signing" / "signing_key.pem"
    assert _mode(key) == 0o600 and _mode(key.parent) == 0o700
    assert [p.name for p in (key.parent / "public").iterdir()] == [f"{made[0]}.pem"]
    assert not [p for p in key.parent.iterdir() if p.name.startswith(".")]  # no temp files left
    secret = signing.seed_secret(settings)
    assert len(secret) == 64 and _mode(key.parent / "seed_secret") == 0o600
    assert signing.seed_secret(settings) == secret
    # Read once per process: a secret that changed under a running service would make
    # identical requests new runs, so a replaced file counts from the next start.
    (key.parent / "seed_secret").write_bytes(b"another secret of enough length\n")
    assert signing.seed_secret(settings) == secret
    listed = signing.published_keys(settings)
    assert [(k.key_id, k.current) for k in listed] == [(made[0], True)]
    assert signing.load_public_keys(json.dumps({"keys": [k.to_dict() for k in listed]})) == {
        made[0]: listed[0].public_key
    }


def test_rotation_keeps_old_public_keys(tmp_path: Path) -> None:
    settings = service_settings(tmp_path / "data")
    before = signing.signer(settings)
    old_cert = before.sign(BODY)
    old, new = signing.rotate_signing_key(settings)
    assert old == before.key_id != new == signing.signer(settings).key_id
    listed = signing.published_keys(settings)
    assert [(k.key_id, k.current) for k in listed] == [(new, True), (old, False)]
    keys = {k.key_id: k.public_key for k in listed}
    assert signing.verify_signature(old_cert, keys) is None
    assert signing.verify_signature(signing.signer(settings).sign(BODY), keys) is None
    assert _mode(tmp_path / "data" / "signing" / "signing_key.pem") == 0o600


def test_a_given_key_file_must_exist_and_is_not_rotated(tmp_path: Path) -> None:
    missing = service_settings(tmp_path / "data", signing_key=str(tmp_path / "nope.pem"))
    with pytest.raises(signing.SigningError, match="DMAE_SIGNING_KEY names .*does not exist"):
        signing.signer(missing)
    given = tmp_path / "mine.pem"
    private = Ed25519PrivateKey.generate()
    given.write_bytes(signing._private_pem(private))
    given.chmod(0o600)
    settings = service_settings(tmp_path / "data", signing_key=str(given))
    assert signing.signer(settings).key_id == signing.key_id(private.public_key())
    with pytest.raises(signing.SigningError, match="replace that file"):
        signing.rotate_signing_key(settings)
    assert signing.published_keys(settings)[0].key_id == signing.key_id(private.public_key())
    with pytest.raises(signing.SigningError, match="DMAE_SEED_SECRET_FILE"):
        signing.seed_secret(service_settings(tmp_path, seed_secret_file=str(tmp_path / "no")))
    given.write_text("not a key")
    with pytest.raises(signing.SigningError, match="cannot read the signing key"):
        signing.signer(settings)


def test_public_keys_from_pem_and_from_get_keys() -> None:
    a, b = (signing.Signer.of(Ed25519PrivateKey.generate()) for _ in range(2))
    pems = signing.public_pem(a.public_key) + signing.public_pem(b.public_key)
    assert set(signing.load_public_keys(pems)) == {a.key_id, b.key_id}
    with pytest.raises(ValueError, match="no public key"):
        signing.load_public_keys("hello")
    with pytest.raises(ValueError, match="GET /keys"):
        signing.load_public_keys('{"keys": [{"nope": 1}]}')


def _seed(secret: bytes, tensor: str = "ab" * 32, n: int = 10_000) -> int:
    return derive_seed(tensor, "cd" * 32, "certify", 0.25, 0.001, 100, n, secret=secret)


def test_the_derived_seed_changes_with_the_server_secret() -> None:
    one, two = b"1" * 32, b"2" * 32
    assert _seed(one) == _seed(one)  # the same request is the same pre-committed run
    assert _seed(one) != _seed(two)
    # Over many requests the two secrets agree no more often than chance (53-bit seeds).
    tensors = [f"{i:064x}" for i in range(500)]
    assert sum(_seed(one, t) == _seed(two, t) for t in tensors) == 0
    seeds = [_seed(one, t) for t in tensors]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**SEED_BITS for s in seeds)
    top = sum(s >> (SEED_BITS - 1) for s in seeds)  # the top bit is used: about half set
    assert 200 <= top <= 300
