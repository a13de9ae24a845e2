"""What a replay found: its certificate's counts beside the original's (pure; no database).

Used by the job code when a replay finishes (``domain.services.replays``) and by the offline
verifier when it re-runs a certificate (``domain.trust.verification``).
"""

from __future__ import annotations

from typing import Any


def device_kind(device: str) -> str:
    """``cuda:1`` -> ``cuda``: counts are reproducible within a kind, not across kinds."""
    return device.split(":", 1)[0]


def compare(
    original: dict[str, Any],
    replayed: dict[str, Any],
    device: str,
    *,
    replay_of: str | None = None,
) -> dict[str, Any]:
    """What a replay (``replayed``: the core's certificate, drawn on ``device``) found:
    ``identical`` when the counts, the selected class's count and the prediction all equal the
    ``original`` certificate's; the differing classes otherwise."""
    before = [int(c) for c in original.get("counts", [])]
    after = [int(c) for c in replayed["counts"]]
    differing = [i for i in range(max(len(before), len(after))) if _at(before, i) != _at(after, i)]
    identical = (
        not differing
        and original.get("count_a") == replayed["count_a"]
        and original.get("prediction") == replayed["prediction"]
    )
    original_device = str(original.get("device", ""))
    return {
        "replay_of": replay_of or original.get("job_id"),
        "identical": identical,
        "counts": after,
        "original_counts": before,
        "differing_classes": differing,
        "count_a": replayed["count_a"],
        "original_count_a": original.get("count_a"),
        "prediction": replayed["prediction"],
        "original_prediction": original.get("prediction"),
        "radius": replayed["radius"],
        "original_radius": original.get("radius"),
        "device": device,
        "original_device": original_device,
        "same_device_kind": device_kind(device) == device_kind(original_device),
    }


def _at(values: list[int], i: int) -> int | None:
    return values[i] if i < len(values) else None
