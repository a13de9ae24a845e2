"""Certified accuracy curves from per-image results (Cohen et al.'s TSV convention).

Numbers are written at full precision (``repr``, which reads back to the same float); a radius,
bound or accuracy shown rounded is rounded *down* (:func:`round_down`), toward the safe side.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_FLOOR, Decimal
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np

TSV_COLUMNS = (
    "idx", "label", "predict", "radius", "correct", "time", "decision", "n_used",
    "count_a", "n", "pa_lower", "n0", "sigma", "alpha", "max_radius", "target_radius", "bound",
    "name", "tensor_sha256", "preprocessing", "warnings", "samples_total",
)  # fmt: skip
# Files written before samples_total (every forward pass, selection included) was recorded:
# read as before, the column empty. It is the last column so readers by position keep working.
LEGACY_COLUMNS = TSV_COLUMNS[:-1]
LIST_SEPARATOR = " | "  # between preprocessing steps (or warnings) in one TSV cell


def round_down(value: float, digits: int = 4) -> str:
    """``value`` with ``digits`` decimals, rounded toward -infinity: the printed number never
    exceeds the float (a radius of 0.49996 shows as 0.4999, not 0.5000)."""
    quantum = Decimal(1).scaleb(-digits)
    return str(Decimal(repr(float(value))).quantize(quantum, rounding=ROUND_FLOOR))


def _cell(text: str) -> str:
    return text.replace("\t", " ").replace("\n", " ")


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
    tensor_sha256: str = ""
    preprocessing: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    decision: str = ""  # decide: certified, not_certified or undecided
    n_used: int | None = None  # estimation samples drawn (None: n)
    target_radius: float | None = None  # decide: the radius decided about
    bound: str = ""  # the bound behind pa_lower (clopper-pearson, or the confidence sequence)
    samples_total: int | None = None  # every forward pass, selection included (None: unknown)

    @property
    def correct(self) -> int:
        return int(self.label >= 0 and self.predict == self.label)

    def tsv(self) -> str:
        """One TSV line; radius, pa_lower, max_radius, sigma and alpha at full precision."""
        pa = "" if self.pa_lower is None else repr(float(self.pa_lower))
        target = "" if self.target_radius is None else repr(float(self.target_radius))
        used = self.n if self.n_used is None else self.n_used
        return "\t".join(
            [
                str(self.idx), str(self.label), str(self.predict), repr(float(self.radius)),
                str(self.correct), f"{self.time:.4f}", self.decision, str(used),
                str(self.count_a), str(self.n), pa, str(self.n0), repr(float(self.sigma)),
                repr(float(self.alpha)), repr(float(self.max_radius)), target, self.bound,
                _cell(self.name), self.tensor_sha256,
                _cell(LIST_SEPARATOR.join(self.preprocessing)),
                _cell(LIST_SEPARATOR.join(self.warnings)),
                "" if self.samples_total is None else str(self.samples_total),
            ]
        )  # fmt: skip

    @classmethod
    def parse(cls, line: str) -> Row:
        """The row a :meth:`tsv` line was written from (ValueError if it is not one)."""
        cells = line.rstrip("\n").split("\t")
        if len(cells) == len(LEGACY_COLUMNS):
            cells.append("")
        if len(cells) != len(TSV_COLUMNS):
            raise ValueError(f"{len(cells)} cells, expected {len(TSV_COLUMNS)}")
        v = dict(zip(TSV_COLUMNS, cells, strict=True))

        def items(text: str) -> list[str]:
            return text.split(LIST_SEPARATOR) if text else []

        return cls(
            idx=int(v["idx"]), label=int(v["label"]), predict=int(v["predict"]),
            radius=float(v["radius"]), time=float(v["time"]), count_a=int(v["count_a"]),
            n=int(v["n"]), pa_lower=float(v["pa_lower"]) if v["pa_lower"] else None,
            n0=int(v["n0"]), sigma=float(v["sigma"]), alpha=float(v["alpha"]),
            max_radius=float(v["max_radius"]), name=v["name"], tensor_sha256=v["tensor_sha256"],
            preprocessing=items(v["preprocessing"]), warnings=items(v["warnings"]),
            decision=v["decision"], n_used=int(v["n_used"]),
            target_radius=float(v["target_radius"]) if v["target_radius"] else None,
            bound=v["bound"],
            samples_total=int(v["samples_total"]) if v["samples_total"] else None,
        )  # fmt: skip


def write_tsv(path: str | Path, rows: Iterable[Row]) -> None:
    with TsvWriter(path) as out:
        for row in rows:
            out.write(row)


SKIPPED_FOOTER = "# skipped"


def skipped_lines(skipped: Iterable[tuple[str, str]]) -> list[str]:
    """Footer lines (no newline) naming each file of the set that was not certified:
    ``# skipped<TAB>name<TAB>reason``. :func:`read_tsv` ignores lines starting with ``#``."""
    clean = str.maketrans({"\t": " ", "\n": " ", "\r": " "})
    return [
        f"{SKIPPED_FOOTER}\t{name.translate(clean)}\t{reason.translate(clean)}"
        for name, reason in skipped
    ]


def tsv_text(rows: Iterable[Row], skipped: Iterable[tuple[str, str]] = ()) -> str:
    """The whole TSV (header, rows, then a footer line per skipped file) as text: what
    :class:`TsvWriter` writes to a file."""
    return "".join([
        "\t".join(TSV_COLUMNS) + "\n",
        *(row.tsv() + "\n" for row in rows),
        *(line + "\n" for line in skipped_lines(skipped)),
    ])  # fmt: skip


def _legacy_header(path: Path) -> bool:
    with open(path, encoding="utf-8") as f:
        return f.readline().rstrip("\n") == "\t".join(LEGACY_COLUMNS)


def read_tsv(path: str | Path) -> list[Row]:
    """The complete rows of a TSV written by :class:`TsvWriter`; a last line cut off by a kill
    (no newline) and comment lines (``#``: the skipped files' footer) are left out. ValueError
    when the file is not such a TSV."""
    text = Path(path).read_text(encoding="utf-8")
    lines = text.split("\n")
    if not lines or lines[0] not in ("\t".join(TSV_COLUMNS), "\t".join(LEGACY_COLUMNS)):
        raise ValueError(f"{path}: not a dmae-certify TSV (header differs)")
    complete = lines[1:-1]  # the last element follows the last newline: empty or cut off
    rows = []
    for number, line in enumerate(complete, start=2):
        if line.startswith("#"):
            continue
        try:
            rows.append(Row.parse(line))
        except ValueError as exc:
            raise ValueError(f"{path}:{number}: not a result row ({exc})") from exc
    return rows


class TsvWriter:
    """Writes rows one at a time, each flushed as soon as it is written, so a run that is
    killed leaves every finished row on disk. ``append`` continues an existing file (its
    header already written) after dropping a last line cut off by a kill."""

    def __init__(self, path: str | Path, append: bool = False):
        path = Path(path)
        if append and path.exists() and _legacy_header(path):
            write_tsv(path, read_tsv(path))  # rewritten with the samples_total column (empty)
        if append and path.exists():
            data = path.read_bytes()
            keep = data[: data.rfind(b"\n") + 1]  # whole lines only
            # An earlier run's footer: this run writes its own at the end.
            keep = b"".join(ln for ln in keep.splitlines(keepends=True) if not ln.startswith(b"#"))
            if keep != data:
                path.write_bytes(keep)
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        else:
            self._file = open(path, "w", encoding="utf-8")  # noqa: SIM115
            self._file.write("\t".join(TSV_COLUMNS) + "\n")
            self._file.flush()

    def write(self, row: Row) -> None:
        self._file.write(row.tsv() + "\n")
        self._file.flush()

    def footer(self, skipped: Iterable[tuple[str, str]]) -> None:
        """The footer lines of :func:`skipped_lines` (after the last row)."""
        for line in skipped_lines(skipped):
            self._file.write(line + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> TsvWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def default_radii(max_radius: float, step: float = 0.25) -> list[float]:
    """0, step, 2 step, ... up to the largest radius these n and alpha can certify."""
    count = int(np.floor(max_radius / step + 1e-9)) + 1
    return [round(i * step, 10) for i in range(count)]


class Scored(Protocol):
    """What the curves need of a result: whether it is correct (0/1) and its radius."""

    @property
    def correct(self) -> int: ...

    @property
    def radius(self) -> float: ...


class Decided(Scored, Protocol):
    """What a DECIDE summary needs of a result (a :class:`Row` has it)."""

    @property
    def label(self) -> int: ...

    @property
    def decision(self) -> str: ...

    @property
    def n_used(self) -> int | None: ...

    @property
    def n(self) -> int: ...


def certified_accuracy(rows: Sequence[Scored], radii: Sequence[float]) -> list[float]:
    """Fraction of rows with predict == label and radius >= r (abstentions count as wrong;
    Cohen et al. 2019, section 4)."""
    if not rows:
        return [0.0 for _ in radii]
    correct = np.array([r.correct for r in rows], dtype=bool)
    radius = np.array([r.radius for r in rows])
    return [float(np.mean(correct & (radius >= r))) for r in radii]


def average_certified_radius(rows: Sequence[Scored]) -> float:
    """ACR (Zhai et al., MACER, ICLR 2020): the mean over rows of the radius of a correct
    prediction, 0 for a wrong one or an abstention (the area under the certified-accuracy
    curve)."""
    if not rows:
        return 0.0
    return float(np.mean([r.radius if r.correct else 0.0 for r in rows]))


@dataclass(frozen=True)
class DecisionStats:
    """DECIDE over a set: the share of each decision, certified accuracy at the target (None
    without labels), estimation samples drawn, and the saving against a fixed-n CERTIFY."""

    count: int
    certified: float
    not_certified: float
    undecided: float
    certified_accuracy: float | None
    n_used_median: float
    n_used_mean: float
    samples_saved: float  # (CERTIFY_N0 + n) per input over n0 + n_used per input


CERTIFY_N0 = 100  # the selection samples of the fixed-n CERTIFY that samples_saved compares with


def decision_stats(rows: Sequence[Decided], n: int, n0: int) -> DecisionStats:
    """:class:`DecisionStats` of DECIDE ``rows`` made with cap ``n`` and ``n0`` selection
    samples (ValueError when there are none). ``samples_saved``: all forward passes of a
    fixed-n CERTIFY at n with n0 = CERTIFY_N0 over DECIDE's (n0 + n_used), per input."""
    if not rows:
        raise ValueError("no decisions to summarise")
    count = len(rows)
    share = {d: sum(r.decision == d for r in rows) / count for d in ("certified", "not_certified")}
    undecided = sum(r.decision not in share for r in rows) / count
    used = [r.n_used if r.n_used is not None else r.n for r in rows]
    labelled = any(r.label >= 0 for r in rows)
    right = sum(r.decision == "certified" and r.correct for r in rows)
    return DecisionStats(
        count=count,
        certified=share["certified"],
        not_certified=share["not_certified"],
        undecided=undecided,
        certified_accuracy=right / count if labelled else None,
        n_used_median=float(np.median(used)),
        n_used_mean=float(np.mean(used)),
        samples_saved=count * (CERTIFY_N0 + n) / sum(n0 + u for u in used),
    )


def certified_fraction(rows: Sequence[Row], radii: Sequence[float]) -> list[float]:
    """Fraction of rows certified (not abstained) at radius >= r, for unlabelled inputs."""
    if not rows:
        return [0.0 for _ in radii]
    ok = np.array([r.predict >= 0 for r in rows], dtype=bool)
    radius = np.array([r.radius for r in rows])
    return [float(np.mean(ok & (radius >= r))) for r in radii]


def curve_title(model: str, sigma: float, n: int, alpha: float, note: str = "") -> str:
    """The title of a certified-accuracy plot: what was certified, with which n and alpha."""
    return f"{model} sigma={sigma:g} n={n} alpha={alpha:g}" + (f" ({note})" if note else "")


def plot_curve(path: str | Path | BinaryIO, rows: Sequence[Row], title: str) -> None:
    """PNG of certified accuracy (or certified fraction, unlabelled) against radius, written to
    ``path`` (a file name or a binary file object). Uses matplotlib's object interface, not
    pyplot's global state, so threads of a server may draw at the same time."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    top = max([r.max_radius for r in rows] + [0.0])
    grid = list(np.linspace(0.0, max(top, 1e-3), 400))
    labelled = any(r.label >= 0 for r in rows)
    values = certified_accuracy(rows, grid) if labelled else certified_fraction(rows, grid)
    fig = Figure(figsize=(5, 3.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot(grid, values, drawstyle="steps-post")
    ax.set_xlabel("L2 radius")
    ax.set_ylabel("certified accuracy" if labelled else "fraction certified")
    ax.set_ylim(0, 1.02)  # a curve at 1.0 stays visible above the frame
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
