"""Per-box confidence from the log-probabilities of the tokens that wrote the box.

AP ranks predictions by score; a constant score makes AP depend on emission order, so scores
come from the model unless a constant is explicitly asked for.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from coordexp.parsing import ObjectTokens


def box_scores(token_logprobs: Sequence[float] | np.ndarray, tokens: Sequence[ObjectTokens],
               *, desc_weight: float = 0.0) -> list[float]:
    """One score per object: the geometric mean of its 4 coord-token probabilities, fused as
    (1 - desc_weight) * geom + desc_weight * mean(desc-token probabilities) when desc_weight > 0.

    token_logprobs [T]: log-probability of each generated token (natural log);
    tokens: from parse_coordjson_tokens (indices into token_logprobs).
    """
    if not 0.0 <= desc_weight <= 1.0:
        raise ValueError(f"desc_weight must be in [0, 1], got {desc_weight}")
    logp = np.asarray(token_logprobs, dtype=np.float64)  # [T]
    scores = []
    for t in tokens:
        geom = float(np.exp(logp[t.coords].mean()))
        if desc_weight > 0 and t.desc:
            desc = float(np.exp(logp[t.desc]).mean())
            geom = (1.0 - desc_weight) * geom + desc_weight * desc
        scores.append(geom)
    return scores
