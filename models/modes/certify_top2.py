"""certify_top2: CERTIFY's radius from both top classes, sigma/2 (Phi^-1(pA_lower) -
Phi^-1(pB_upper)), with simultaneous (Bonferroni) bounds; pA at alpha/2 (Cohen et al. 2019)."""

from __future__ import annotations

from models.modes.certify import Certify


class CertifyTop2(Certify):
    """The top-2 variant of CERTIFY (``certify --top2`` on the command line)."""

    name = "certify_top2"
    family = Certify.name
    core = name  # its own sample-size rule: pA is bounded at alpha / 2
    top2 = True

    def level(self, alpha: float) -> float:
        return alpha / 2


MODE = CertifyTop2()
