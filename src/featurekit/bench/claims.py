"""The papers' qualitative claims, checked on one synthetic benchmark's rows.

Each claim names the methods and the dataset it needs and a rule on the measured numbers; its
verdict is "holds", "does not hold", "not run (method missing)" (a method is not in the
registry), "not run (method not selected)", "not run (dataset not selected)" or "not run
(method failed)". Rules (all at the benchmark's one budget; equal sparsity = the same k):

* topk_recovers        TopK at the true k: MMCS true→learned ≥ 0.9 (default data)
* topk_absorption      TopK shows absorption on hierarchical data: absorption rate ≥ 0.05
* fc_fewer_dead        Feature Choice has a lower dead fraction than TopK (default; equal k)
* mc_fewer_dead        Mutual Choice has a lower dead fraction than TopK (default; equal k)
* mpsae_hierarchy      MP-SAE vs TopK on hierarchical data: absorption rate not higher and children
                       recovered not lower, one of them strictly better
* matryoshka_absorption Matryoshka has a lower absorption rate than BatchTopK (hierarchical)
* abstopk_bidirectional AbsTopK covers the bidirectional features (both signs) with fewer latents per
                       covered feature than TopK, and covers at least as many (−0.05)
* batchtopk_vs_topk    BatchTopK's FVU is below TopK's FVU at the same L0 (TopK re-run at inference k±2,
                       linear interpolation / extrapolation of FVU at BatchTopK's L0; default data)
* vsae_more_dead       vSAE has a higher dead fraction than TopK (default)
* topafa_adaptive      top-AFA's per-token L0 varies (std > 0) and correlates with the true number of
                       active features (Pearson r ≥ 0.1; default)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

ABSORPTION_VISIBLE = 0.05
CORRELATION_MIN = 0.1

Rows = dict[tuple[str, str], dict]


def _claim(cid: str, text: str, dataset: str, methods: list[str], rule: Callable[[Rows], tuple[bool, dict]]) -> dict:
    return {"id": cid, "claim": text, "dataset": dataset, "methods": methods, "rule": rule}


def _f(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _topk_recovers(r: Rows) -> tuple[bool, dict]:
    row = r["default", "topk"]
    return row["mmcs_true_to_learned"] >= 0.9, {"topk_mmcs_true_to_learned": row["mmcs_true_to_learned"],
                                               "topk_recovered_fraction": row["recovered_fraction"]}


def _topk_absorption(r: Rows) -> tuple[bool, dict]:
    row = r["hierarchical", "topk"]
    return (row["absorption_rate"] or 0) >= ABSORPTION_VISIBLE, {"topk_absorption_rate": row["absorption_rate"],
                                                                 "topk_parent_silent_rate": row["parent_silent_rate"]}


def _fewer_dead(method: str) -> Callable[[Rows], tuple[bool, dict]]:
    def rule(r: Rows) -> tuple[bool, dict]:
        m, t = r["default", method], r["default", "topk"]
        return m["dead_fraction"] < t["dead_fraction"], {f"{method}_dead": m["dead_fraction"], "topk_dead": t["dead_fraction"],
                                                          f"{method}_l0": m["l0"], "topk_l0": t["l0"]}
    return rule


def _mpsae(r: Rows) -> tuple[bool, dict]:
    t, m = r["hierarchical", "topk"], r["hierarchical", "mpsae"]
    nums = {"mpsae_absorption_rate": m["absorption_rate"], "topk_absorption_rate": t["absorption_rate"],
            "mpsae_children_recovered": m["children_recovered"], "topk_children_recovered": t["children_recovered"]}
    a_le, c_ge = m["absorption_rate"] <= t["absorption_rate"], m["children_recovered"] >= t["children_recovered"]
    strict = m["absorption_rate"] < t["absorption_rate"] or m["children_recovered"] > t["children_recovered"]
    return a_le and c_ge and strict, nums


def _matryoshka(r: Rows) -> tuple[bool, dict]:
    m, b = r["hierarchical", "matryoshka"], r["hierarchical", "batchtopk"]
    return m["absorption_rate"] < b["absorption_rate"], {"matryoshka_absorption_rate": m["absorption_rate"],
                                                         "batchtopk_absorption_rate": b["absorption_rate"]}


def _abstopk(r: Rows) -> tuple[bool, dict]:
    a, t = r["bidirectional", "abstopk"], r["bidirectional", "topk"]
    nums = {"abstopk_coverage": a["bidirectional_coverage"], "topk_coverage": t["bidirectional_coverage"],
            "abstopk_latents_per_feature": a["latents_per_bidirectional"], "topk_latents_per_feature": t["latents_per_bidirectional"],
            "abstopk_fvu": a["fvu"], "topk_fvu": t["fvu"]}
    if a["latents_per_bidirectional"] is None:
        return False, nums
    fewer = t["latents_per_bidirectional"] is None or a["latents_per_bidirectional"] < t["latents_per_bidirectional"]
    return fewer and a["bidirectional_coverage"] >= t["bidirectional_coverage"] - 0.05, nums


def interpolate(curve: list[list[float]], l0: float) -> float:
    """FVU at `l0` on a (L0, FVU) curve: linear between the two nearest points (extrapolates at the ends)."""
    pts = sorted(curve)
    lo, hi = pts[0], pts[1]
    for a, b in zip(pts, pts[1:]):
        lo, hi = a, b
        if b[0] >= l0:
            break
    if hi[0] == lo[0]:
        return lo[1]
    return lo[1] + (hi[1] - lo[1]) * (l0 - lo[0]) / (hi[0] - lo[0])


def _batchtopk(r: Rows) -> tuple[bool, dict]:
    b, t = r["default", "batchtopk"], r["default", "topk"]
    matched = interpolate(t["l0_fvu_curve"], b["l0"])
    return b["fvu"] < matched, {"batchtopk_l0": b["l0"], "batchtopk_fvu": b["fvu"], "topk_fvu_at_that_l0": matched,
                                "topk_l0": t["l0"], "topk_fvu": t["fvu"]}


def _vsae(r: Rows) -> tuple[bool, dict]:
    v, t = r["default", "vsae"], r["default", "topk"]
    return v["dead_fraction"] > t["dead_fraction"], {"vsae_dead": v["dead_fraction"], "topk_dead": t["dead_fraction"],
                                                     "vsae_l0": v["l0"], "topk_l0": t["l0"]}


def _topafa(r: Rows) -> tuple[bool, dict]:
    a = r["default", "topafa"]
    corr = a["l0_true_corr"]
    return a["l0_std"] > 0 and corr is not None and corr >= CORRELATION_MIN, {"topafa_l0": a["l0"], "topafa_l0_std": a["l0_std"],
                                                                              "topafa_l0_true_corr": corr}


CLAIMS = [
    _claim("topk_recovers", "TopK at the true k recovers the features (MMCS true→learned ≥ 0.9)", "default", ["topk"], _topk_recovers),
    _claim("topk_absorption", f"Absorption is visible for TopK on hierarchical data (absorption rate ≥ {ABSORPTION_VISIBLE})",
           "hierarchical", ["topk"], _topk_absorption),
    _claim("fc_fewer_dead", "Feature Choice has fewer dead latents than TopK at equal sparsity", "default",
           ["topk", "featurechoice"], _fewer_dead("featurechoice")),
    _claim("mc_fewer_dead", "Mutual Choice has fewer dead latents than TopK at equal sparsity", "default",
           ["topk", "mutualchoice"], _fewer_dead("mutualchoice")),
    _claim("mpsae_hierarchy", "MP-SAE handles hierarchical features better than TopK (lower absorption / better child recovery)",
           "hierarchical", ["topk", "mpsae"], _mpsae),
    _claim("matryoshka_absorption", "Matryoshka absorbs less than BatchTopK on hierarchical data", "hierarchical",
           ["batchtopk", "matryoshka"], _matryoshka),
    _claim("abstopk_bidirectional", "AbsTopK represents bidirectional features with fewer latents than TopK", "bidirectional",
           ["topk", "abstopk"], _abstopk),
    _claim("batchtopk_vs_topk", "BatchTopK reconstructs better than TopK at equal mean L0", "default", ["topk", "batchtopk"], _batchtopk),
    _claim("vsae_more_dead", "vSAE has more dead latents than TopK", "default", ["topk", "vsae"], _vsae),
    _claim("topafa_adaptive",
           f"top-AFA chooses k per token (per-token L0 varies and correlates with the true count, r ≥ {CORRELATION_MIN})",
           "default", ["topafa"], _topafa),
]


def evaluate_claims(rows: list[dict], datasets: list[str], selected: set[str], registered: set[str]) -> list[dict]:
    """Each claim with its verdict and the numbers behind it."""
    by_key = {(row["dataset"], row["method"]): row for row in rows}
    out = []
    for c in CLAIMS:
        entry = {k: c[k] for k in ("id", "claim", "dataset", "methods")}
        missing = [m for m in c["methods"] if m not in registered]
        unselected = [m for m in c["methods"] if m not in selected]
        failed = [m for m in c["methods"] if "error" in by_key.get((c["dataset"], m), {})]
        if missing:
            entry["verdict"], entry["detail"] = "not run (method missing)", f"not in the registry: {', '.join(missing)}"
        elif unselected:
            entry["verdict"], entry["detail"] = "not run (method not selected)", f"not selected: {', '.join(unselected)}"
        elif c["dataset"] not in datasets:
            entry["verdict"], entry["detail"] = "not run (dataset not selected)", f"needs the {c['dataset']} dataset"
        elif failed:
            entry["verdict"], entry["detail"] = "not run (method failed)", f"failed: {', '.join(failed)}"
        else:
            try:
                holds, numbers = c["rule"](by_key)
            except (KeyError, TypeError) as err:  # a score the rule needs is missing (e.g. no tokens for a child)
                entry["verdict"], entry["detail"] = "not checked", f"a score is missing: {type(err).__name__}: {err}"
                out.append(entry)
                continue
            entry["verdict"] = "holds" if holds else "does not hold"
            entry["numbers"] = numbers
            entry["detail"] = ", ".join(f"{k}={_f(v) if not isinstance(v, str) else v}" for k, v in numbers.items())
        out.append(entry)
    return out
