"""GET /keys: the public keys certificates are signed with (no authentication needed)."""

from __future__ import annotations

from fastapi import APIRouter

from app.routes.deps import SessionEndingRoute, SettingsDep
from app.schemas import SigningKeyOut, SigningKeysOut
from domain.trust import signing

router = APIRouter(route_class=SessionEndingRoute, tags=["signing"])

SIGNATURE = (
    "base64 (RFC 4648) of the Ed25519 signature (RFC 8032) of the canonical bytes; the "
    "certificate's key_id names the key"
)


@router.get("/keys", response_model=SigningKeysOut, summary="Public keys that sign certificates")
def signing_keys(settings: SettingsDep) -> SigningKeysOut:
    """Every public key this service has signed certificates with: the current one first
    (``current``), then earlier ones kept after rotations, so old certificates still verify.
    `dmae-certify verify CERT.json --server URL` reads this."""
    keys = [SigningKeyOut(**k.to_dict()) for k in signing.published_keys(settings)]
    return SigningKeysOut(keys=keys, canonicalization=signing.CANONICALIZATION, signature=SIGNATURE)
