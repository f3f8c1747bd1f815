"""Plain-words readings of the numbers, as the seed note writes them: how f1 and mAP move
together, what the coord diagnostics say about the distributions, what a correlation means."""

from __future__ import annotations

from coordexp.report.analysis import fmt

MASS_HIGH = 0.99  # coord-vocab mass above this: hardly any probability leaks to text tokens


def _dir(trends: dict, key: str) -> str | None:
    t = trends.get(key)
    return t["direction"] if t else None


def _pct(trends: dict, key: str) -> str:
    rel = trends[key]["relative"]
    return f" ({rel * 100:+.1f}%)" if rel is not None else ""


def eval_reading(trends: dict) -> list[str]:
    """f1 vs mAP, and what to check when they diverge (seed note section 4.2)."""
    f1, ap = _dir(trends, "rollout/f1"), _dir(trends, "rollout/mAP")
    if f1 is None or ap is None:
        return []
    verb = {"flat": "is flat", "rises": "rises", "falls": "falls"}
    text = f"`f1` {verb[f1]}{_pct(trends, 'rollout/f1')} while `mAP` {verb[ap]}" \
           f"{_pct(trends, 'rollout/mAP')}."
    if {f1, ap} == {"rises", "falls"}:
        counts = ", ".join(f"`{k.split('/')[1]}` {_dir(trends, k)}"
                           for k in ("rollout/pred_objects", "rollout/fp_total",
                                     "rollout/fn_total") if _dir(trends, k))
        text += (" They diverge: mAP rewards localisation across IoU thresholds, f1 rewards "
                 f"object-count calibration; check the counts ({counts or 'not logged'}), the "
                 "parse drop counters and near-duplicates in the dumps.")
    return [text]


def diagnostics_reading(trends: dict, near_rows: list[dict]) -> list[str]:
    """Expected-bin error vs peakedness, and coord-vocab mass (seed note sections 3.1, 3.3)."""
    out = []
    mae = _dir(trends, "coord_diag/expected_bin_mae")
    if mae in ("rises", "falls"):
        closer = "closer to" if mae == "falls" else "further from"
        out.append(f"The expected coordinate moves {closer} the GT bin (`expected_bin_mae` {mae}"
                   f"{_pct(trends, 'coord_diag/expected_bin_mae')}).")
    peaks = [k for k in ("coord_diag/p_gt_mean", "coord_diag/acc_top5") if k in trends]
    if peaks and mae == "falls" and all(_dir(trends, k) == "flat" for k in peaks):
        names = ", ".join(f"`{k.split('/')[1]}`" for k in peaks)
        out.append(f"The distributions do not get sharper ({names} flat): good for expectation "
                   "decoding, a concern for greedy discrete coord tokens.")
    mass = [r.get("coord_diag/coord_vocab_mass_mean") for r in near_rows]
    if mass and mass[-1] is not None and mass[-1] >= MASS_HIGH:
        out.append(f"Coord-vocab mass is {fmt(mass[-1])} at the last step: hardly any "
                   "probability leaks from coord slots to text tokens.")
    return out


def coord_tokens_reading(r: float) -> str:
    """Why the coord loss curve fluctuates (seed note section 3.2)."""
    if r >= 0.3:
        return (f"`loss/coord_soft_ce` rises with the number of supervised coord slots in the step "
                f"(r = {r:.2f}): steps with more objects are harder, so the coord-loss curve "
                "fluctuates with batch content even while the model improves.")
    return (f"`loss/coord_soft_ce` barely follows the number of coord slots per step (r = {r:.2f}):"
            " its fluctuation is not explained by batch object counts.")


def strength(r: float) -> str:
    size = abs(r)
    word = ("negligible" if size < 0.1 else "weak" if size < 0.3 else
            "moderate" if size < 0.6 else "strong")
    return f"{word} {'positive' if r > 0 else 'negative'}" if word != "negligible" else word
