"""``Scores``: one number per unit, with ranking, tables, grids and files."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float

from tl_transplant.arch.units import (
    UNIT_KINDS,
    Head,
    KVHead,
    Neuron,
    Unit,
    normalize_kinds,
    parse_unit,
    unit_sort_key,
)
from tl_transplant.edit.budget import (
    DEFAULT_BUDGET_RULE,
    BudgetPick,
    BudgetRule,
    check_rule,
    fill_budget,
)
from tl_transplant.scoring.registry import (
    INVERSE_FRACTION,
    AlphaScale,
    ScoringError,
    traits_meta,
)

if TYPE_CHECKING:
    from tl_transplant.arch.model_layout import ModelLayout

SCORES_FORMAT = "tl_transplant.scores/1"
_COUNT_KEYS = {"head": "H", "kv_head": "KV", "neuron": "I"}


def _index(u: Unit, linear_names: Sequence[str]) -> int:
    if isinstance(u, Head):
        return u.head
    if isinstance(u, KVHead):
        return u.group
    if isinstance(u, Neuron):
        return u.index
    names = list(linear_names)
    return names.index(u.name) if u.name in names else -1


def _floats(t: torch.Tensor | None) -> list[float | None] | None:
    if t is None:
        return None
    return [None if math.isnan(x) else float(x) for x in t.tolist()]


def _tensor(xs: Sequence[float | None] | None) -> torch.Tensor | None:
    if xs is None:
        return None
    return torch.tensor([math.nan if x is None else float(x) for x in xs], dtype=torch.float64)


class Scores:
    """Scores of units by one method. Higher means "more worth transplanting".

    ``values``, ``consistency`` and the extra ``columns`` are float64 vectors
    aligned with ``units``. ``meta`` records how the scores were made (method
    options, task, pair, model dims), and survives ``save``/``load``.

    How a sweep uses them is typed: :attr:`budget_rule` (how a parameter budget is
    filled), :attr:`suggested` (the scorer's own unit set), :attr:`alpha_scale` and
    :attr:`dense_alphas` (see :class:`~tl_transplant.scoring.registry.RawScores`). Each
    is read from ``meta`` when not given (files and code of 0.1 keep working) and written
    into ``meta`` when given, so a saved file reloads the same.
    """

    #: The grain of unit scores (``"dense"`` for the dense baseline).
    grain: str

    def __init__(
        self,
        units: Sequence[Unit | str],
        values: Float[torch.Tensor, " n"] | Sequence[float],
        *,
        method: str,
        consistency: Float[torch.Tensor, " n"] | Sequence[float] | None = None,
        columns: dict[str, Float[torch.Tensor, " n"]] | None = None,
        meta: dict[str, Any] | None = None,
        budget_rule: BudgetRule | str | None = None,
        suggested: Sequence[Unit | str] | None = None,
        alpha_scale: AlphaScale | None = None,
        dense_alphas: Sequence[float] | None = None,
    ) -> None:
        self.units: list[Unit] = [parse_unit(u) for u in units]
        self.values = torch.as_tensor(values, dtype=torch.float64).detach().cpu().reshape(-1)
        n = len(self.units)
        if self.values.numel() != n:
            raise ScoringError(f"{n} units but {self.values.numel()} scores")
        self.consistency = (
            None if consistency is None
            else torch.as_tensor(consistency, dtype=torch.float64).detach().cpu().reshape(-1)
        )
        if self.consistency is not None and self.consistency.numel() != n:
            raise ScoringError(f"{n} units but {self.consistency.numel()} consistency values")
        self.columns = {
            k: torch.as_tensor(v, dtype=torch.float64).detach().cpu().reshape(-1)
            for k, v in (columns or {}).items()
        }
        self.method = method
        m: dict[str, Any] = dict(meta or {})
        # The rule is checked when a budget is filled (budget_rule), not here.
        self._budget_rule: str | None = (
            str(budget_rule) if budget_rule is not None else m.get("budget_rule"))
        got = suggested if suggested is not None else m.get("suggested")
        #: The scorer's own suggested unit set (e.g. learned_mask's gates > 0.5), if any.
        self.suggested: list[Unit] | None = (
            [parse_unit(u) for u in got] if isinstance(got, (list, tuple)) else None)
        scale = alpha_scale if alpha_scale is not None else m.get("alpha_scale")
        if scale is not None and scale != INVERSE_FRACTION:
            raise ScoringError(f"alpha_scale must be {INVERSE_FRACTION!r} or None, got {scale!r}")
        #: ``"inverse_fraction"``: the sweep moves this method's sets at alpha x block params /
        #: params moved (DARE's 1/p, an extrapolating control).
        self.alpha_scale: AlphaScale | None = scale
        alphas = dense_alphas if dense_alphas is not None else (
            m.get("alphas") if m.get("dense") else None)
        if m.get("dense") and not alphas:
            raise ScoringError("a dense method's scores need its own alpha grid "
                               "(dense_alphas, or meta['alphas'])")
        #: The dense baseline's own alpha grid (every block weight at one alpha), else None.
        self.dense_alphas: list[float] | None = (
            None if alphas is None else sorted({float(a) for a in alphas}))
        self.grain = "dense" if self.dense_alphas is not None else "unit"
        self.meta: dict[str, Any] = traits_meta(
            m, budget_rule=self._budget_rule, alpha_scale=self.alpha_scale,
            suggested=None if self.suggested is None else [str(u) for u in self.suggested],
            dense_alphas=self.dense_alphas)
        self._pos = {u: i for i, u in enumerate(self.units)}

    # ---- basics -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.units)

    def __iter__(self) -> Iterator[tuple[Unit, float]]:
        return iter(zip(self.units, self.values.tolist()))

    def __contains__(self, unit: object) -> bool:
        try:
            return parse_unit(unit) in self._pos  # type: ignore[arg-type]
        except ValueError:
            return False

    def __getitem__(self, unit: Unit | str) -> float:
        """The score of one unit (``scores["L1.H2"]``)."""
        u = parse_unit(unit)
        if u not in self._pos:
            raise KeyError(f"{u} was not scored (scored kinds: {', '.join(self.kinds)})")
        return float(self.values[self._pos[u]])

    def __repr__(self) -> str:
        best = ", ".join(f"{u}={v:.4g}" for u, v in zip(self.top(3), self._top_values(3)))
        return f"Scores(method={self.method!r}, n={len(self)}, kinds={self.kinds}, top: {best})"

    @property
    def kinds(self) -> tuple[str, ...]:
        present = {u.kind for u in self.units}
        return tuple(k for k in UNIT_KINDS if k in present)

    @property
    def signed(self) -> bool:
        return bool(self.meta.get("signed", False))

    # ---- ranking ------------------------------------------------------------------------
    def _ranked(self, kinds: str | Iterable[str] | None, descending: bool) -> list[int]:
        allowed = set(normalize_kinds(kinds))
        idx = [
            i for i, u in enumerate(self.units)
            if u.kind in allowed and not math.isnan(float(self.values[i]))
        ]
        sign = -1.0 if descending else 1.0
        vals = self.values.tolist()
        return sorted(idx, key=lambda i: (sign * vals[i], unit_sort_key(self.units[i])))

    def _check_k(self, k: int) -> int:
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ScoringError(f"k must be an int >= 0, got {k!r}")
        return k

    def top(self, k: int, kinds: str | Iterable[str] | None = None) -> list[Unit]:
        """The ``k`` highest-scoring units (of the given kinds); ties by unit order, NaN last."""
        return [self.units[i] for i in self._ranked(kinds, True)[: self._check_k(k)]]

    def bottom(self, k: int, kinds: str | Iterable[str] | None = None) -> list[Unit]:
        """The ``k`` lowest-scoring units: the "anti-selection" control."""
        return [self.units[i] for i in self._ranked(kinds, False)[: self._check_k(k)]]

    @property
    def budget_rule(self) -> BudgetRule:
        """How a parameter budget is filled (:mod:`tl_transplant.edit.budget`), default
        ``"per_param"``; an unknown rule is refused here."""
        return check_rule(self._budget_rule or DEFAULT_BUDGET_RULE)

    def within_budget(
        self,
        fraction: float,
        layout: ModelLayout,
        kinds: str | Iterable[str] | None = None,
        kv: str = "group",
    ) -> list[Unit]:
        """Units (of ``kinds``) whose distinct weights fit ``fraction`` of the block parameters.

        ``layout``: the pair's :class:`~tl_transplant.arch.ModelLayout` (``pair.layout``).
        The fill rule is :attr:`budget_rule` (see :mod:`tl_transplant.edit.budget`); KV groups
        that ``kv="group"`` brings along count against the budget.
        """
        return self.budget_pick(fraction, layout, kinds, kv).units

    def budget_pick(
        self,
        fraction: float,
        layout: ModelLayout,
        kinds: str | Iterable[str] | None = None,
        kv: str = "group",
    ) -> BudgetPick:
        """:meth:`within_budget` with its cost: a :class:`~tl_transplant.edit.budget.BudgetPick`."""
        idx = self._ranked(kinds, True)
        return fill_budget([self.units[i] for i in idx], layout, fraction,
                           values=[float(self.values[i]) for i in idx], rule=self.budget_rule,
                           kv=kv)

    def _top_values(self, k: int) -> list[float]:
        return [float(self.values[i]) for i in self._ranked(None, True)[:k]]

    def filter(self, kinds: str | Iterable[str]) -> Scores:
        """The scores of the given kinds only."""
        allowed = set(normalize_kinds(kinds))
        keep = [i for i, u in enumerate(self.units) if u.kind in allowed]
        idx = torch.tensor(keep, dtype=torch.long)
        return Scores(
            [self.units[i] for i in keep], self.values[idx], method=self.method,
            consistency=None if self.consistency is None else self.consistency[idx],
            columns={k: v[idx] for k, v in self.columns.items()}, meta=self.meta,
            budget_rule=self._budget_rule, suggested=self.suggested,
            alpha_scale=self.alpha_scale, dense_alphas=self.dense_alphas,
        )

    # ---- views --------------------------------------------------------------------------
    def to_frame(self) -> Any:
        """A pandas DataFrame: unit, kind, layer, index, score, consistency, method, extras."""
        import pandas as pd

        names = self.meta.get("linear_names", [])
        data: dict[str, Any] = {
            "unit": [str(u) for u in self.units],
            "kind": [u.kind for u in self.units],
            "layer": [u.layer for u in self.units],
            "index": [_index(u, names) for u in self.units],
            "score": self.values.numpy(),
            "consistency": (
                self.consistency.numpy() if self.consistency is not None
                else [math.nan] * len(self)
            ),
            "method": [self.method] * len(self),
        }
        for k, v in self.columns.items():
            data[k] = v.numpy()
        return pd.DataFrame(data)

    def as_grid(self, kind: str) -> Float[torch.Tensor, "layers n"]:
        """``[layers x units-per-layer]`` scores for a heatmap (NaN where not scored)."""
        (k,) = normalize_kinds(kind)
        units = [(i, u) for i, u in enumerate(self.units) if u.kind == k]
        if not units:
            raise ScoringError(f"no {k} units were scored (scored kinds: {', '.join(self.kinds)})")
        names = self.meta.get("linear_names", [])
        dims = self.meta.get("dims", {})
        n_layers = int(dims.get("n_layers", max(u.layer for _, u in units) + 1))
        if k == "linear":
            width = len(names) or max(_index(u, names) for _, u in units) + 1
        else:
            width = int(dims.get(_COUNT_KEYS[k], max(_index(u, names) for _, u in units) + 1))
        grid = torch.full((n_layers, width), math.nan, dtype=torch.float64)
        for i, u in units:
            grid[u.layer, _index(u, names)] = self.values[i]
        return grid

    # ---- files --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SCORES_FORMAT,
            "method": self.method,
            "meta": self.meta,
            "units": [str(u) for u in self.units],
            "score": _floats(self.values),
            "consistency": _floats(self.consistency),
            "columns": {k: _floats(v) for k, v in self.columns.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scores:
        if d.get("format") != SCORES_FORMAT:
            raise ScoringError(
                f"not a tl_transplant scores file (format={d.get('format')!r}, "
                f"expected {SCORES_FORMAT!r})"
            )
        cols = {k: _tensor(v) for k, v in d.get("columns", {}).items()}
        values = _tensor(d["score"])
        if values is None:
            raise ScoringError("not a usable scores file: 'score' is null; re-run score() and save")
        return cls(
            d["units"], values, method=d["method"],
            consistency=_tensor(d.get("consistency")),
            columns={k: v for k, v in cols.items() if v is not None}, meta=d.get("meta", {}),
        )

    def save(self, path: str | Path) -> Path:
        """Write ``.json`` or ``.parquet`` (chosen by the suffix); returns the path."""
        p = Path(path)
        try:
            return self._save(p)
        except OSError as e:
            raise ScoringError(f"cannot write scores to {p}: {e.strerror or e}; choose a path "
                               "you can write to") from e

    def _save(self, p: Path) -> Path:
        suffix = p.suffix.lower()
        if suffix == ".json":
            p.write_text(json.dumps(self.to_dict(), indent=1, default=str, allow_nan=False))
        elif suffix in (".parquet", ".pq"):
            pa, pq = _pyarrow()
            table = pa.Table.from_pandas(self.to_frame(), preserve_index=False)
            head = {k: v for k, v in self.to_dict().items() if k in ("format", "method", "meta")}
            head["has_consistency"] = self.consistency is not None
            head["columns"] = list(self.columns)
            md = dict(table.schema.metadata or {})
            md[b"tl_transplant"] = json.dumps(head, default=str).encode()
            pq.write_table(table.replace_schema_metadata(md), p)
        else:
            raise ScoringError(f"cannot save scores as {p.name!r}: use a .json or .parquet path")
        return p

    @classmethod
    def load(cls, path: str | Path) -> Scores:
        """Read scores written by :meth:`save` (a :class:`ScoringError` says why not)."""
        p = Path(path)
        try:
            return cls._load(p)
        except ScoringError:
            raise
        except (OSError, ValueError, KeyError) as e:  # unreadable, not JSON, a key missing
            why = e.strerror if isinstance(e, OSError) and e.strerror else e
            raise ScoringError(f"cannot read scores from {p}: {why}") from e

    @classmethod
    def _load(cls, p: Path) -> Scores:
        suffix = p.suffix.lower()
        if suffix == ".json":
            return cls.from_dict(json.loads(p.read_text()))
        if suffix in (".parquet", ".pq"):
            _, pq = _pyarrow()
            table = pq.read_table(p)
            raw = (table.schema.metadata or {}).get(b"tl_transplant")
            if raw is None:
                raise ScoringError(f"{p} is a parquet file but not a tl_transplant scores file")
            head = json.loads(raw)
            df = table.to_pandas()
            d = dict(head)
            d["units"] = df["unit"].tolist()
            d["score"] = df["score"].tolist()
            d["consistency"] = df["consistency"].tolist() if head["has_consistency"] else None
            d["columns"] = {k: df[k].tolist() for k in head["columns"]}
            d["score"] = [None if math.isnan(x) else x for x in d["score"]]
            return cls.from_dict(d)
        raise ScoringError(f"cannot load scores from {p.name!r}: expected .json or .parquet")


def _pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - pyarrow ships with our pandas installs
        raise ImportError("saving scores as parquet needs pyarrow (pip install pyarrow); "
                          "or save as .json") from e
    return pa, pq
