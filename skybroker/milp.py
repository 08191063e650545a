"""The MILP backends of the placement optimizer: a model in column/row arrays (`Lp`) and
two ways to solve it: HiGHS through highspy directly (`run_highs`: arrays, no modelling
layer, an optional incumbent to start from) and pulp (`run_pulp`: HiGHS or CBC, the fallback
when highspy is missing). Each returns the status, values, objective, dual bound and gap
the solver reports.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field

import numpy as np

_banner_silenced = False


def _silence_highs_banner() -> None:
    """HiGHS prints a banner to fd 1 when the first Highs() of a process is made; make that
    one with stdout pointed at /dev/null so `--json` output stays clean."""
    global _banner_silenced
    if _banner_silenced:
        return
    _banner_silenced = True
    try:
        import highspy
    except ImportError:
        return
    import ctypes

    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        highspy.Highs()
        ctypes.CDLL(None).fflush(None)  # the banner sits in C stdio's buffer until flushed
    finally:
        os.dup2(saved, 1)
        os.close(devnull)
        os.close(saved)


@dataclass(slots=True)
class Lp:
    """A MILP in column/row form that either backend solves (highspy directly, or pulp)."""

    lb: list[float] = field(default_factory=list)
    ub: list[float] = field(default_factory=list)
    cost: list[float] = field(default_factory=list)
    integer: list[int] = field(default_factory=list)  # indices of integer columns
    rlb: list[float] = field(default_factory=list)
    rub: list[float] = field(default_factory=list)
    start: list[int] = field(default_factory=lambda: [0])
    index: list[int] = field(default_factory=list)
    value: list[float] = field(default_factory=list)

    def col(self, lb: float, ub: float, cost: float = 0.0, integer: bool = False) -> int:
        if integer:
            self.integer.append(len(self.lb))
        self.lb.append(lb)
        self.ub.append(ub)
        self.cost.append(cost)
        return len(self.lb) - 1

    def row(self, lb: float, ub: float, terms: list[tuple[int, float]]) -> None:
        if not terms:
            return
        self.rlb.append(lb)
        self.rub.append(ub)
        self.index.extend(c for c, _ in terms)
        self.value.extend(v for _, v in terms)
        self.start.append(len(self.index))

    @property
    def num_rows(self) -> int:
        return len(self.rlb)


@dataclass(slots=True)
class Result:
    status: str  # optimal | feasible | infeasible
    values: list[float]
    cost: float
    bound: float
    gap: float | None


def run_highs(lp: Lp, time_limit: float, gap_rel: float, start: list[float] | None = None,
              node_limit: int | None = None) -> Result:  # fmt: skip
    """Solve `lp` with HiGHS: one thread, a fixed seed, so the same model gives the same
    answer. `node_limit` stops the branch and bound after that many nodes (a limit that,
    unlike the time limit, does not depend on how busy the machine is)."""
    import highspy

    _silence_highs_banner()
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("threads", 1)
    h.setOptionValue("random_seed", 0)
    h.setOptionValue("time_limit", float(time_limit))
    h.setOptionValue("mip_rel_gap", float(gap_rel))
    if node_limit is not None:
        h.setOptionValue("mip_max_nodes", int(node_limit))
    nc = len(lp.lb)
    empty = np.zeros(0, dtype=np.int32)
    h.addCols(nc, np.array(lp.cost), np.array(lp.lb), np.array(lp.ub), 0, empty, empty,
              np.zeros(0))  # fmt: skip
    if lp.integer:
        ints = np.array(lp.integer, dtype=np.int32)
        h.changeColsIntegrality(len(ints), ints, np.ones(len(ints), dtype=np.uint8))
    if lp.num_rows:
        h.addRows(lp.num_rows, np.array(lp.rlb), np.array(lp.rub), len(lp.index),
                  np.array(lp.start[:-1], dtype=np.int32), np.array(lp.index, dtype=np.int32),
                  np.array(lp.value))  # fmt: skip
    if start is not None:  # an incumbent to start from (HiGHS checks it is feasible)
        sol = h.getSolution()
        sol.col_value = start
        sol.value_valid = True
        h.setSolution(sol)
    h.run()
    info = h.getInfo()
    text = h.modelStatusToString(h.getModelStatus()).lower()
    if info.primal_solution_status == 0 or "infeasible" in text:
        return Result("infeasible", [], math.inf, math.inf, None)
    values = list(h.getSolution().col_value)
    cost = float(info.objective_function_value)
    if not lp.integer:  # a pure LP: HiGHS reports no MIP gap
        return Result("optimal" if text == "optimal" else "feasible", values, cost, cost, 0.0)
    gap = max(float(info.mip_gap), 0.0) if math.isfinite(info.mip_gap) else None
    status = "optimal" if text == "optimal" else "feasible"
    return Result(status, values, cost, float(info.mip_dual_bound), gap)


def run_pulp(lp: Lp, solver: str, time_limit: float, gap_rel: float) -> Result:
    """The same MILP through pulp: HiGHS (to compare build times) or CBC (the fallback)."""
    import pulp

    _silence_highs_banner()
    m = pulp.LpProblem("placement", pulp.LpMinimize)
    ints = set(lp.integer)
    cols = [pulp.LpVariable(f"c{j}", lp.lb[j], lp.ub[j], cat="Integer" if j in ints else "Continuous")
            for j in range(len(lp.lb))]  # fmt: skip
    for r in range(lp.num_rows):
        a, b = lp.start[r], lp.start[r + 1]
        e = pulp.LpAffineExpression([(cols[lp.index[k]], lp.value[k]) for k in range(a, b)])
        if lp.rlb[r] == lp.rub[r]:
            m += e == lp.rlb[r], f"r{r}"
        else:
            if math.isfinite(lp.rub[r]):
                m += e <= lp.rub[r], f"r{r}u"
            if math.isfinite(lp.rlb[r]):
                m += e >= lp.rlb[r], f"r{r}l"
    m += pulp.LpAffineExpression([(c, w) for c, w in zip(cols, lp.cost, strict=True) if w])
    if solver == "highs" and pulp.HiGHS().available():
        s = pulp.HiGHS(msg=False, timeLimit=time_limit, gapRel=gap_rel, threads=1)
    else:
        s = pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, gapRel=gap_rel)
    m.solve(s)
    model = getattr(m, "solverModel", None)
    values = [c.value() or 0.0 for c in cols]
    cost = float(pulp.value(m.objective) or 0.0)
    if s.name == "HiGHS" and model is not None:
        info = model.getInfo()
        text = model.modelStatusToString(model.getModelStatus()).lower()
        if info.primal_solution_status == 0 or "infeasible" in text:
            return Result("infeasible", [], math.inf, math.inf, None)
        gap = max(float(info.mip_gap), 0.0) if math.isfinite(info.mip_gap) else None
        status = "optimal" if text == "optimal" else "feasible"
        return Result(status, values, cost, float(info.mip_dual_bound), gap)
    if m.status != pulp.LpStatusOptimal:
        return Result("infeasible", [], math.inf, math.inf, None)
    return Result("feasible", values, cost, -math.inf, None)  # CBC via pulp hides its bound


def has_highspy() -> bool:
    try:
        import highspy  # noqa: F401
    except ImportError:
        return False
    return True
