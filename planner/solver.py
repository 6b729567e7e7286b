"""The MILP/LP solver behind the planner: HiGHS in-process, through PuLP.

In-process matters for speed: the planner solves a few hundred small LPs per plan, and CBC
through PuLP starts a process for each (about 40 ms, most of Mixtral's 8 s worst case on 2
cores). PuLP 3.3's HiGHS wrapper does not know HiGHS's node-limit status, so a MILP stopped at
its node limit raised; `_HiGHS` reports it as an integer-feasible stop, as CBC's wrapper does.
PuLP's wrapper also builds a new HiGHS model on every solve (it has no re-solve); the planner
re-solves each placement model many times with other bounds, so `_HiGHS` keeps the built model
and changes only bounds and integrality: an LP then warm-starts from its last basis.
"""

from __future__ import annotations

import os
import threading

import pulp
from pulp import constants

_banner_lock = threading.Lock()
_banner_shown = False


def _silence_banner() -> None:
    """HiGHS prints a copyright banner to C stdout on the first `Highs()` of a process, whatever
    its options: construct that first one with fd 1 pointed at /dev/null, so that `fluxmoe plan`
    and notebooks print only their own output."""
    global _banner_shown
    with _banner_lock:
        if _banner_shown:
            return
        import highspy

        saved = os.dup(1)
        try:
            with open(os.devnull, "w") as null:
                os.dup2(null.fileno(), 1)
                highspy.Highs()
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        _banner_shown = True


class _HiGHS(pulp.HiGHS):
    """PuLP's HiGHS, plus the node-limit stop (HighsModelStatus.kSolutionLimit)."""

    def actualSolve(self, lp):
        """Solve `lp`, re-using the HiGHS model built for it by an earlier solve when its
        variables and constraints are the same objects (only bounds and integrality change)."""
        import highspy

        variables, constraints = lp.variables(), list(lp._constraints.values())
        shape = ([id(v) for v in variables], [id(c) for c in constraints])
        if getattr(lp, "solverModel", None) is None or getattr(lp, "_fluxmoe_shape", None) != shape:
            return self._solve_fresh(lp, shape)
        model = lp.solverModel
        model.resetOptions()
        self._configure(model)
        inf = highspy.kHighsInf
        model.changeColsBounds(len(variables), list(range(len(variables))),
                               [-inf if v.lowBound is None else v.lowBound for v in variables],
                               [inf if v.upBound is None else v.upBound for v in variables])
        integer = [highspy.HighsVarType.kInteger if v.cat == constants.LpInteger and self.mip
                   else highspy.HighsVarType.kContinuous for v in variables]
        model.changeColsIntegrality(len(variables), list(range(len(variables))), integer)
        if any(t == highspy.HighsVarType.kInteger for t in integer):
            model.clearSolver()  # a MILP never starts from the last solve's values
        return self._finish(lp)

    def createAndConfigureSolver(self, lp):
        """A new HiGHS model with the same options a kept one gets (`_configure`; the planner
        registers no callbacks)."""
        import highspy

        lp.solverModel = highspy.Highs()
        self._configure(lp.solverModel)

    def _solve_fresh(self, lp, shape):
        self.createAndConfigureSolver(lp)
        self.buildSolverModel(lp)
        lp._fluxmoe_shape = shape
        return self._finish(lp)

    def _configure(self, model) -> None:
        """This solve's options (those PuLP's own wrapper sets), on a new or a kept model."""
        model.setOptionValue("output_flag", bool(self.msg))
        for key, value in (("mip_rel_gap", self.gapRel), ("mip_abs_gap", self.gapAbs), ("threads", self.threads),
                           ("time_limit", None if self.timeLimit is None else float(self.timeLimit))):
            if value is not None:
                model.setOptionValue(key, value)
        for key, value in self.optionsDict.items():
            model.setOptionValue(key, value)

    def _finish(self, lp):
        self.callSolver(lp)
        status, sol_status = self.findSolutionValues(lp)
        lp.assignStatus(status, sol_status)
        return status

    def findSolutionValues(self, lp):
        import highspy

        if lp.solverModel.getModelStatus() != highspy.HighsModelStatus.kSolutionLimit:
            return super().findSolutionValues(lp)
        found = bool(lp.solverModel.getInfo().primal_solution_status)
        if found:
            for var, value in zip(lp.variables(), lp.solverModel.getSolution().col_value):
                var.varValue = value
        solution = constants.LpSolutionIntegerFeasible if found else constants.LpSolutionNoSolutionFound
        status = constants.LpStatusOptimal if found else constants.LpStatusNotSolved
        lp.assignStatus(status, solution)
        return status, solution


def freeze_variables(prob: pulp.LpProblem) -> None:
    """PuLP rebuilds a problem's variable list from every constraint each time it is asked (in
    each solve, several times): a fifth of a Mixtral plan's time at 97 GiB. A placement model
    keeps its variables and constraints once built (re-solves change only bounds, integrality
    and options), so the list is taken once and handed back from then on."""
    variables = prob.variables()
    prob.variables = lambda: variables


def solver(gap: float, node_limit: int, time_limit_s: float, cutoff: float | None = None) -> pulp.LpSolver:
    """One thread (plans must not depend on the machine), relative gap, node limit, safety time
    limit; `cutoff`: only solutions whose objective is below it matter. No MIP start (see
    `_Problem.milp`)."""
    _silence_banner()
    # No strong branching before pseudo-costs (reliability 0) and no restart after the root's
    # reductions: over a 1 GiB sweep of every shipped model (1,421 plans, 2 cores) the slowest
    # plan went from 2.35 s to 1.33 s and the median from 0.10 to 0.08 s, plans within -1.2% /
    # +0.6% of before (node-limited MILPs; bench/NOTES.md, session 12).
    # Presolve and RINS stay on: without both, the 1 GiB sweep's worst plan took 0.91 s instead of
    # 1.27, but node-limited MILPs then missed plans with resident experts beside routed host
    # ones (Qwen3-Next, one sequence, 60-70 GiB: 1-1.3% slower) and DeepSeek-V2-Lite's best
    # (2-3% slower); bench/NOTES.md, session 15.
    options = {"mip_pscost_minreliable": 0, "mip_allow_restart": False}
    if cutoff is not None:
        options["objective_bound"] = cutoff
    return _HiGHS(msg=False, gapRel=gap, threads=1, timeLimit=time_limit_s, mip_max_nodes=node_limit,
                  **options)
