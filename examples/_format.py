"""How the DP examples print accuracies over seeds."""

import numpy as np


def accuracy_text(accuracies: list[float]) -> str:
    """`mean% ± std` over the seeds (as fractions in, percent out); one seed has no
    spread to show, so none is printed."""
    values = 100 * np.asarray(accuracies)
    if len(values) == 1:
        return f"{values[0]:.1f}% (one seed)"
    return f"{values.mean():.1f}% ± {values.std():.1f}"
