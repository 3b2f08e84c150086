"""What an importance score is, its registry, and the table of scores it produces.

A score is one class: the unit kinds it can score, whether it needs calibration data and
gradients, and ``compute(context)`` returning one array per (block, unit kind) in the
kind's shape (``kind.shape(block)``), higher = more important to keep. Register it with
``register_score`` to make it a ``--method`` name, or pass an instance to
``onnxprune.prune(method=...)`` / ``onnxprune.score(method=...)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from onnxprune.errors import OnnxpruneError
from onnxprune.structure.discover import Analysis
from onnxprune.units import Unit, UnitKind, granularity_kinds, unit_kinds

if TYPE_CHECKING:
    from onnxprune.losses import LossSpec
    from onnxprune.scores.distributed import RayCluster

ScoreKey = tuple[str, UnitKind]                 # (block name, unit kind)
ScoreArrays = dict[ScoreKey, np.ndarray]
Batches = Callable[[], list[tuple[dict, dict]]]
Progress = Callable[[int, int], None]


@dataclass
class ScoreContext:
    """What a score may read: the analysed model, the calibration batches (loss-target
    feeds included), the loss, the unit kinds asked for, and run options."""

    analysis: Analysis
    batches: Batches | None
    spec: LossSpec | None
    kinds: set[UnitKind]
    seed: int = 0
    threads: int = 0
    ema: float = 0.5             # the smoothing of progressive steps (the pipeline applies it)
    progress: Progress | None = None
    fallbacks: list[str] = field(default_factory=list)   # notes a score leaves
    samples_seen: int | None = None                      # when a score counts its own
    signed: ScoreArrays = field(default_factory=dict)    # signed estimates a score leaves
    gradients: dict[ScoreKey, GradientSketch] = field(default_factory=dict)
    cluster: RayCluster | None = None    # gradient batches on Ray workers (distributed.py)

    @property
    def samples(self) -> int:
        if self.batches is None:
            return 0
        return sum(len(next(iter(inputs.values()))) for inputs, _ in self.batches())


@dataclass
class GradientSketch:
    """The gate gradients of one (block, kind) over the calibration set, enough for the
    block's empirical Fisher F = mean_n g_n g_nᵀ (Kwon et al. 2022, mask rearrangement).

    ``rows`` holds at most a fixed number of rows: sample n is added, with a random sign, to
    row n mod rows, so rowsᵀrows equals Σ_n g_n g_nᵀ exactly while every sample has its own
    row, and in expectation beyond that (the cross terms cancel) at bounded memory."""

    mean: np.ndarray             # mean_n g_n, [units]
    square: np.ndarray           # mean_n g_n², [units] (the exact diagonal of F)
    rows: np.ndarray             # [rows, units]
    samples: int

    def fisher(self) -> np.ndarray:
        """The empirical Fisher [units, units]: sketched off-diagonal, exact diagonal."""
        rows = self.rows.astype(np.float64)
        f = rows.T @ rows / max(self.samples, 1)
        np.fill_diagonal(f, self.square)
        return f


@dataclass
class Scores:
    """Scores by (block, unit kind); each array has the kind's shape in that block.
    ``signed`` holds the signed loss estimates where the score has them (fisher: the
    values are their absolute values), ``gradients`` the gradient sketches of gradient
    scores (what mask rearrangement reads)."""

    method: str
    values: ScoreArrays
    samples: int
    seconds: float = 0.0
    fallbacks: list[str] = field(default_factory=list)
    signed: ScoreArrays = field(default_factory=dict)
    gradients: dict[ScoreKey, GradientSketch] = field(default_factory=dict)

    def array(self, block: str, kind: UnitKind | str) -> np.ndarray | None:
        key = kind.key if isinstance(kind, UnitKind) else kind
        return next((v for (b, k), v in self.values.items() if b == block and k.key == key),
                    None)

    def items(self) -> Iterator[tuple[Unit, float]]:
        """Every scored unit with its score."""
        for (block, kind), value in self.values.items():
            value = np.asarray(value, dtype=np.float64)
            for index in np.ndindex(*value.shape):
                yield Unit(kind, block, tuple(int(i) for i in index)), float(value[index])

    def units(self) -> dict[str, float]:
        """Every scored unit by name (DESIGN.md unit names): the printed form."""
        return {unit.name: value for unit, value in self.items()}


class ImportanceScore:
    """Base of every importance score. Subclasses set ``name`` and ``kinds`` (unit kind
    keys; None: every kind) and implement ``compute``."""

    name: ClassVar[str] = "custom"
    kinds: ClassVar[frozenset[str] | None] = None
    needs_data: ClassVar[bool] = False
    needs_gradients: ClassVar[bool] = False

    def scores_kind(self, kind: UnitKind) -> bool:
        return self.kinds is None or kind.key in self.kinds

    def compute(self, context: ScoreContext) -> ScoreArrays:
        raise NotImplementedError


_SCORES: dict[str, type[ImportanceScore]] = {}


def register_score(cls: type[ImportanceScore]) -> type[ImportanceScore]:
    """Class decorator: make a score available by its ``name``."""
    if cls.name in _SCORES:
        raise ValueError(f"score {cls.name!r} is already registered")
    _SCORES[cls.name] = cls
    return cls


def score_names() -> tuple[str, ...]:
    return tuple(_SCORES)


def granularities() -> tuple[str, ...]:
    names = list(granularity_kinds())
    return ("auto", *[n for n in names if n != "auto"])


def resolve_score(method: str | ImportanceScore) -> ImportanceScore:
    """A registered score by name, or the instance given."""
    if isinstance(method, ImportanceScore):
        return method
    if method not in _SCORES:
        raise OnnxpruneError(f"--method {method!r}: choose one of {', '.join(_SCORES)}")
    return _SCORES[method]()


def check_method(method: str | ImportanceScore, granularity: str) -> set[UnitKind]:
    """The unit kinds to score; raise when the method cannot score the granularity."""
    score = resolve_score(method)
    table = granularity_kinds()
    if granularity not in table:
        raise OnnxpruneError(f"--granularity {granularity!r}: choose one of "
                             f"{', '.join(granularities())}")
    wanted = {k for k in unit_kinds() if k.key in table[granularity]}
    kinds = {k for k in wanted if score.scores_kind(k)}
    if (granularity != "auto" and kinds != wanted) or not kinds:
        usable = [g for g in granularities()
                  if all(score.scores_kind(k) for k in unit_kinds() if k.key in table[g])]
        raise OnnxpruneError(f"--method {score.name} does not score --granularity "
                             f"{granularity} units; with {score.name} use {', '.join(usable)}")
    return kinds
