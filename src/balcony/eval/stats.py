"""Statistics for comparing variants scored on the same items."""

from __future__ import annotations

import math
from typing import Sequence


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Mean of a - b over the same documents, with its standard error.

    Two variants scored on the same items are compared item by item: the standard error of
    the mean difference is std(a_i - b_i) / sqrt(n), much smaller than that of either score
    when both get mostly the same items right, and the honest scale for "does A beat B".

    Args:
        a, b: Per-document values (e.g. 0/1 correctness) of two variants, same documents in the same order.

    Returns:
        {"diff": mean(a - b), "se": its standard error (nan for n < 2), "n": n,
        "wins": documents where a > b, "losses": where a < b}.

    Example:
        >>> paired_difference([1, 1, 0, 1], [1, 0, 0, 0])["diff"]
        0.5
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_difference needs two equally long, non-empty sequences, got {len(a)} and {len(b)} values")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n) if n > 1 else float("nan")
    return {"diff": mean, "se": se, "n": n, "wins": sum(x > 0 for x in d), "losses": sum(x < 0 for x in d)}
