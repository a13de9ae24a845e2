"""Names of the training recipes, as recorded in a checkpoint's ``training["recipe_name"]``.

A pre-training recipe is named by its noise and its loss:

- ``dmae``: Gaussian noise (sigma > 0), loss over all patches (Wu et al. 2023, sec. 3.2);
- ``mae``: no noise, loss over the masked patches only (He et al. 2022, sec. 3);
- ``mae-all-patches``: no noise, DMAE's all-patch loss;
- ``dmae-masked-loss``: noise, MAE's masked-patch loss.

A fine-tuned classifier is named ``INIT+METHOD``: INIT is the recipe of the encoder it started
from (a pre-training name above, ``scratch`` for a random encoder, ``official`` for an official
DMAE release file, ``unknown`` for a checkpoint that records none), METHOD ``consistency``
(Jeong & Shin 2020 regularisation, DMAE's fine-tuning) or ``gaussian`` (plain Gaussian-noise
augmentation with cross-entropy, Cohen et al. 2019: no KL term and no entropy term). E.g.
``dmae+consistency`` (the bundled digits models), ``mae+consistency``,
``scratch+consistency``, ``scratch+gaussian``.
"""

from __future__ import annotations

from typing import Any

RECIPE_FIELD = "recipe_name"
SCRATCH = "scratch"
OFFICIAL = "official"
UNKNOWN = "unknown"


def pretrain_recipe_name(sigma: float, loss_on: str) -> str:
    """``dmae``, ``mae``, ``mae-all-patches`` or ``dmae-masked-loss`` (see the module doc)."""
    if sigma > 0:
        return "dmae" if loss_on == "all" else "dmae-masked-loss"
    return "mae" if loss_on == "masked" else "mae-all-patches"


def finetune_method(copies: int, lbd: float, eta: float) -> str:
    """``gaussian`` when the loss is plain cross-entropy on noisy copies, else ``consistency``.

    The KL term vanishes with one copy or lambda = 0; the entropy term with eta = 0.
    """
    no_kl = copies == 1 or lbd == 0
    return "gaussian" if no_kl and eta == 0 else "consistency"


def recipe_name_of(training: dict[str, Any]) -> str | None:
    """The recipe name of a checkpoint's ``training`` record: the recorded one, or derived from
    its settings for checkpoints written before the name was recorded. None when the record
    does not say (imported or official files)."""
    if not training:
        return None
    name = training.get(RECIPE_FIELD)
    if isinstance(name, str):
        return name
    recipe = training.get("recipe") or {}
    if training.get("stage") == "pretrain" and "sigma" in recipe:
        return pretrain_recipe_name(float(recipe["sigma"]), str(recipe.get("loss_on", "all")))
    if training.get("stage") == "finetune" and {"copies", "lbd", "eta"} <= set(recipe):
        method = finetune_method(int(recipe["copies"]), float(recipe["lbd"]), float(recipe["eta"]))
        return f"{init_name(training.get('pretrained') or {})}+{method}"
    return None


def init_name(pretrained: dict[str, Any]) -> str:
    """The INIT part of a fine-tuning recipe from its ``training["pretrained"]`` record."""
    if pretrained.get("kind") == "none":
        return SCRATCH
    if pretrained.get("official"):
        return OFFICIAL
    return recipe_name_of(pretrained.get("training") or {}) or UNKNOWN
