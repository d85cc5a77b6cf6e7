"""The training progress bar: the loss, and the epsilon spent, computed off the loop."""

import math
import threading
from collections.abc import Callable

from jaxtyping import Array

from ._state import PrivacyReport


class Progress:
    """A tqdm bar if tqdm is installed, else a printed line every tenth of the run.

    Epsilon is computed in a background thread (an accountant call takes a second or
    more), at most once per tenth of the run, so it never holds up training.
    """

    def __init__(
        self,
        enabled: bool,
        total: int,
        initial: int,
        epsilon_fn: Callable[[int], float] | None,
    ):
        """`epsilon_fn(steps)`: the epsilon after that many steps; None for a
        non-private run (no epsilon is shown)."""
        self.enabled = enabled
        self.total = total
        self.epsilon_fn = epsilon_fn
        self.every = max(1, total // 100)
        self.tenth = max(1, total // 10)
        self.epsilon: tuple[int, float] | None = None
        self.thread: threading.Thread | None = None
        self.bar = None
        self.text: dict[str, str] = {}
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            print(f"Training: step {initial}/{total}")
        else:
            self.bar = tqdm(total=total, initial=initial, desc="training")
        self._request(initial)

    def _request(self, steps: int) -> None:
        epsilon_fn = self.epsilon_fn
        if epsilon_fn is None or steps == 0:  # nothing spent yet: nothing to show
            return
        if self.thread is not None and self.thread.is_alive():
            return

        def work() -> None:
            self.epsilon = (steps, epsilon_fn(steps))

        self.thread = threading.Thread(target=work, daemon=True)
        self.thread.start()

    def update(self, steps: int, metrics: dict[str, Array]) -> None:
        if not self.enabled:
            return
        if steps % self.tenth == 0 or self.epsilon is None:
            self._request(steps)
        if steps % self.every and steps != self.total:
            if self.bar is not None:
                self.bar.update(1)
            return
        loss = float(metrics["loss"])
        text = {"loss": "n/a" if math.isnan(loss) else f"{loss:.4f}"}
        clip = float(metrics.get("clip_norm", math.nan))
        if not math.isnan(clip):  # adaptive clipping
            text["clip"] = f"{clip:.3g}"
        if self.epsilon is not None:
            text["eps"] = f"{format_epsilon(self.epsilon[1])} (step {self.epsilon[0]})"
        self.text = text
        if self.bar is not None:
            self.bar.set_postfix(text, refresh=False)
            self.bar.update(1)
        elif steps % self.tenth == 0 or steps == self.total:
            details = "  ".join(f"{k} {v}" for k, v in text.items())
            print(f"Training: step {steps}/{self.total}  {details}")

    def close(self, report: PrivacyReport) -> None:
        if not self.enabled:
            return
        private = self.epsilon_fn is not None
        if self.bar is not None:
            if private:
                self.bar.set_postfix({**self.text, "eps": format_epsilon(report.epsilon)})
            self.bar.close()
        spent = (
            f"epsilon {report.epsilon:.4g} at delta {report.delta:g}"
            if private
            else "not private (no epsilon)"
        )
        print(f"Trained {report.steps} of {report.iterations} steps: {spent}.")


def format_epsilon(epsilon: float) -> str:
    """Two significant digits, trailing zeros kept (`1.0`, `0.35`, `12`)."""
    if not math.isfinite(epsilon):
        return f"{epsilon}"
    if epsilon >= 10:
        return f"{epsilon:.0f}"
    return f"{epsilon:#.2g}"
