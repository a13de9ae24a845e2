"""Certified accuracy curves from per-image results (Cohen et al.'s TSV convention)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TSV_COLUMNS = (
    "idx", "label", "predict", "radius", "correct", "time",
    "count_a", "n", "pa_lower", "n0", "sigma", "alpha", "max_radius", "name",
)  # fmt: skip


@dataclass
class Row:
    """One certified input. ``predict`` is -1 for an abstention, ``label`` -1 when unknown."""

    idx: int
    label: int
    predict: int
    radius: float
    time: float
    count_a: int
    n: int
    pa_lower: float | None
    n0: int
    sigma: float
    alpha: float
    max_radius: float
    name: str

    @property
    def correct(self) -> int:
        return int(self.label >= 0 and self.predict == self.label)

    def tsv(self) -> str:
        pa = "" if self.pa_lower is None else f"{self.pa_lower:.6f}"
        return "\t".join(
            [
                str(self.idx), str(self.label), str(self.predict), f"{self.radius:.4f}",
                str(self.correct), f"{self.time:.4f}", str(self.count_a), str(self.n), pa,
                str(self.n0), f"{self.sigma:g}", f"{self.alpha:g}", f"{self.max_radius:.4f}",
                self.name.replace("\t", " "),
            ]
        )  # fmt: skip


def write_tsv(path: str | Path, rows: Iterable[Row]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write("\t".join(TSV_COLUMNS) + "\n")
        for row in rows:
            f.write(row.tsv() + "\n")


def read_tsv(path: str | Path) -> list[Row]:
    """Rows of a file written by :func:`write_tsv` (radius and pa_lower as printed there)."""
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        if tuple(header) != TSV_COLUMNS:
            raise ValueError(f"{path}: not a certification TSV (columns {TSV_COLUMNS})")
        rows = []
        for number, line in enumerate(f, start=2):
            v = line.rstrip("\n").split("\t")
            if len(v) != len(TSV_COLUMNS):
                raise ValueError(f"{path}:{number}: expected {len(TSV_COLUMNS)} columns")
            rows.append(
                Row(
                    idx=int(v[0]),
                    label=int(v[1]),
                    predict=int(v[2]),
                    radius=float(v[3]),
                    time=float(v[5]),
                    count_a=int(v[6]),
                    n=int(v[7]),
                    pa_lower=float(v[8]) if v[8] else None,
                    n0=int(v[9]),
                    sigma=float(v[10]),
                    alpha=float(v[11]),
                    max_radius=float(v[12]),
                    name=v[13],
                )  # fmt: skip
            )
    return rows


def default_radii(max_radius: float, step: float = 0.25) -> list[float]:
    """0, step, 2 step, ... up to the largest radius these n and alpha can certify."""
    count = int(np.floor(max_radius / step + 1e-9)) + 1
    return [round(i * step, 10) for i in range(count)]


def certified_accuracy(rows: Sequence[Row], radii: Sequence[float]) -> list[float]:
    """Fraction of rows with predict == label and radius >= r (abstentions count as wrong)."""
    if not rows:
        return [0.0 for _ in radii]
    correct = np.array([r.correct for r in rows], dtype=bool)
    radius = np.array([r.radius for r in rows])
    return [float(np.mean(correct & (radius >= r))) for r in radii]


def certified_fraction(rows: Sequence[Row], radii: Sequence[float]) -> list[float]:
    """Fraction of rows certified (not abstained) at radius >= r, for unlabelled inputs."""
    if not rows:
        return [0.0 for _ in radii]
    ok = np.array([r.predict >= 0 for r in rows], dtype=bool)
    radius = np.array([r.radius for r in rows])
    return [float(np.mean(ok & (radius >= r))) for r in radii]


def plot_curve(path: str | Path, rows: Sequence[Row], title: str) -> None:
    """PNG of certified accuracy (or certified fraction, unlabelled) against radius."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = max([r.max_radius for r in rows] + [0.0])
    grid = list(np.linspace(0.0, max(top, 1e-3), 400))
    labelled = any(r.label >= 0 for r in rows)
    values = certified_accuracy(rows, grid) if labelled else certified_fraction(rows, grid)
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.plot(grid, values, drawstyle="steps-post")
    ax.set_xlabel("L2 radius")
    ax.set_ylabel("certified accuracy" if labelled else "fraction certified")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
