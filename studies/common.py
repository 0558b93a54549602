"""Plumbing shared by the studies: tables, a progress bar, protocol instances from the registry."""

from __future__ import annotations

import csv
import math
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mpc_fi.errors import ConfigError, MpcFiError
from mpc_fi.plugins import PROTOCOLS, registry

Row = dict[str, Any]


# ---------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------
class Progress:
    """A one-line text progress bar on stderr (``\\r``-updated on a terminal, one line per step
    otherwise), with elapsed time and a naive remaining-time estimate."""

    def __init__(self, total: int, label: str, *, enabled: bool = True, stream: Any = None) -> None:
        self.total = max(1, int(total))
        self.label = label
        self.done = 0
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def step(self, note: str = "") -> None:
        self.done += 1
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        width = 24
        filled = int(width * self.done / self.total)
        bar = "#" * filled + "." * (width - filled)
        line = (f"{self.label} [{bar}] {self.done}/{self.total} {elapsed:5.0f}s elapsed, "
                f"~{eta:4.0f}s left {note}")
        if self._tty:
            end = "\n" if self.done >= self.total else ""
            self.stream.write("\r" + line[:150].ljust(150) + end)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


# ---------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------
def write_csv(rows: Sequence[Row], path: str | Path) -> Path:
    """Write ``rows`` (dicts; the union of their keys, in first-seen order) as CSV."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields: list[str] = []
    for row in rows:
        fields.extend(k for k in row if k not in fields)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(row.get(k, "")) for k in fields})
    return path


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value


def markdown_table(rows: Sequence[Sequence[Any]], header: Sequence[str],
                   align: str | None = None) -> str:
    """A GitHub Markdown table; floats as given (format them before)."""
    align = align or "l" + "r" * (len(header) - 1)
    marks = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(marks[a] for a in align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def fmt(value: float, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.{digits}f}"


#: Confidence level of every interval the studies report.
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """A mean over independent runs (seeds) and its two-sided Student-t confidence interval.

    With ``n`` runs the interval is ``mean ± t_{n-1, 0.975} · s / √n`` (``s``: the sample
    standard deviation); with one run it is undefined (``lo = hi = nan``).
    """

    mean: float
    lo: float
    hi: float
    n: int

    @property
    def half(self) -> float:
        return (self.hi - self.lo) / 2

    def excludes(self, value: float) -> bool:
        """True when the interval lies strictly above or below ``value``."""
        return self.lo > value or self.hi < value

    def text(self, digits: int = 3) -> str:
        """``0.532 [0.498, 0.565]``."""
        if math.isnan(self.mean):
            return "–"
        if self.n < 2:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} [{self.lo:.{digits}f}, {self.hi:.{digits}f}]"

    def short(self, digits: int = 3) -> str:
        """``0.532 ± 0.034`` (± the interval's half-width)."""
        if math.isnan(self.mean):
            return "–"
        if self.n < 2:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.half:.{digits}f}"


def mean_ci(values: Iterable[float], level: float = CONFIDENCE) -> Interval:
    """Mean and Student-t confidence interval of ``values`` (NaN and None are dropped)."""
    from scipy import stats  # noqa: PLC0415

    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if v.size == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(v.mean())
    if v.size < 2:
        return Interval(mean, math.nan, math.nan, 1)
    half = float(stats.t.ppf(0.5 + level / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return Interval(mean, mean - half, mean + half, int(v.size))


class StudyNoise:
    """A reproducible Gaussian noise supply for the plaintext twins of noisy protocols.

    It has the interface of ``protocols.noise.NoiseSource`` (``gaussian(shape, std)``) and draws
    from a numpy ``Generator`` seeded per run: the studies' DP columns then reproduce from their
    seeds. **Experiments only**: the engine's parties draw their noise from a CSPRNG, never from
    this (its noise is predictable to anyone who knows the seed).
    """

    def __init__(self, seed: int | Sequence[int]) -> None:
        self.rng = np.random.default_rng(seed)

    def gaussian(self, shape: Sequence[int], std: float) -> Any:
        import torch  # noqa: PLC0415

        return torch.from_numpy(self.rng.normal(0.0, std, tuple(shape)))


def study_noise(parties: int, seed: int, stream: int = 0) -> list[StudyNoise]:
    """One :class:`StudyNoise` per computing party (owners, then the querier) for one run."""
    return [StudyNoise((seed, stream, k)) for k in range(parties)]


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


# ---------------------------------------------------------------------------------------
# Protocols from the registry, with study parameters
# ---------------------------------------------------------------------------------------
def default_params(name: str, num_owners: int) -> dict[str, Any]:
    """Parameters the studies give protocols that require some (known names only).

    The thresholds scale with the number of owners ``N``: a confident vote needs a strict
    majority of votes; Confident-GNMax needs the same, checked with noise of std ``N / 4``;
    GNMax noise has std 1 vote. Unknown protocols get no parameters (and are skipped, with the
    reason, if they need some: pass them with ``--param NAME.KEY=VALUE``).
    """
    majority = num_owners // 2 + 1
    table: dict[str, dict[str, Any]] = {
        "gnmax": {"sigma": 1.0},
        "confident_gnmax": {"threshold": float(majority), "sigma_threshold": num_owners / 4,
                            "sigma": 1.0},
        "confident_vote": {"threshold": float(majority)},
    }
    return dict(table.get(name, {}))


@dataclass(frozen=True)
class ProtocolSpec:
    """A registered protocol with the parameters a study gives it."""

    name: str
    cls: Any
    params: Mapping[str, Any]

    @property
    def differentially_private(self) -> bool:
        return bool(getattr(self.cls, "differentially_private", False))

    def build(self, *, num_classes: int, num_owners: int, owner_weights: Sequence[float],
              reveal: str = "label", precision_bits: int = 16) -> Any:
        return self.cls(num_classes=num_classes, num_owners=num_owners, reveal=reveal,
                        owner_weights=list(owner_weights), precision_bits=precision_bits,
                        **dict(self.params))


def protocol_specs(num_owners: int, *, only: Sequence[str] | None = None,
                   overrides: Mapping[str, Mapping[str, Any]] | None = None) -> list[ProtocolSpec]:
    """Every protocol in the registry *at call time* (or those named in ``only``), sorted."""
    table = registry(PROTOCOLS)
    names = sorted(table) if not only else list(only)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ConfigError(f"unknown protocol(s) {', '.join(unknown)} (available: "
                          f"{', '.join(sorted(table))})", key="--protocols")
    overrides = overrides or {}
    return [ProtocolSpec(n, table[n], {**default_params(n, num_owners), **overrides.get(n, {})})
            for n in names]


def parse_param_overrides(items: Sequence[str] | None) -> dict[str, dict[str, Any]]:
    """``["gnmax.sigma=2", "top_k.k=2"]`` -> ``{"gnmax": {"sigma": 2.0}, "top_k": {"k": 2}}``."""
    out: dict[str, dict[str, Any]] = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        name, dot, param = key.partition(".")
        if not sep or not dot or not name or not param:
            raise ConfigError(f"expected NAME.KEY=VALUE, got {item!r}", key="--param")
        value: Any = raw
        for cast in (int, float):
            try:
                value = cast(raw)
                break
            except ValueError:
                continue
        out.setdefault(name, {})[param] = value
    return out


def accuracy(labels: np.ndarray, truth: np.ndarray) -> tuple[float, float, float]:
    """``(accuracy counting abstentions as wrong, accuracy on answered queries, coverage)``."""
    labels, truth = np.asarray(labels), np.asarray(truth)
    answered = labels != -1
    acc = float((labels == truth).mean())
    cov = float(answered.mean())
    acc_answered = float((labels[answered] == truth[answered]).mean()) if answered.any() else math.nan
    return acc, acc_answered, cov


def describe_failure(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if not isinstance(exc, MpcFiError) else str(exc)
    return " ".join(text.split())[:200]
