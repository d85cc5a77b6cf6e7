"""DP-SGD tuning on scikit-learn's digits: accuracy over batch size x epochs, per epsilon.

Trains the CNN of `examples/dp_digits.py` (same loss, clip norm 1, SGD with momentum 0.9
at learning rate 0.5, Poisson sampling, PLD accounting) at each epsilon for every
(expected batch size, epochs) of a grid, with the noise multiplier calibrated to the
epsilon for that many steps, and records the test accuracy over seeds together with
what explains it: the steps, the noise multiplier, and the standard deviation of the
noise in the *mean* gradient of a step, `noise_multiplier * clip_norm / batch_size`.
The table is what `docs/concepts/dp_tuning.md` quotes. From the repository root:

    python benchmarks/tune_digits.py          # writes results/dp-tuning-digits.md
    python benchmarks/tune_digits.py --quick  # one epsilon, two settings, one seed
"""

import argparse
import datetime
import pathlib
import platform
import sys
import time

import numpy as np


# The examples package lives at the repository root, next to this directory.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from examples.dp_digits import accuracy, CLIP_NORM, load_digits, train_dp  # noqa: E402


EPSILONS = (1.0, 3.0, 8.0)
BATCH_SIZES = (128, 256, 512)
EPOCHS = (4, 8, 15, 30)
SEEDS = (0, 1)
RESULTS = pathlib.Path(__file__).parent / "results" / "dp-tuning-digits.md"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    epsilons, batches, epochs_grid, seeds = (
        ((3.0,), (256,), (4, 8), (0,))
        if args.quick
        else (EPSILONS, BATCH_SIZES, EPOCHS, SEEDS)
    )
    train, test = load_digits()
    num_examples = int(train["label"].shape[0])
    start = time.perf_counter()
    lines = [
        "| epsilon | expected batch | epochs | steps | noise multiplier "
        "| noise std in the mean gradient | test accuracy (mean over seeds) | per seed |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    best: dict[float, tuple[float, int, int]] = {}
    for epsilon in epsilons:
        for batch_size in batches:
            for epochs in epochs_grid:
                noise_multiplier, accuracies, steps = None, [], 0
                for seed in seeds:
                    model, report, noise_multiplier = train_dp(
                        train, epsilon, seed, batch_size, epochs, noise_multiplier, False
                    )
                    accuracies.append(100 * float(accuracy(model, test)))
                    steps = report.steps
                assert noise_multiplier is not None
                mean = float(np.mean(accuracies))
                per_seed = ", ".join(f"{a:.1f}" for a in accuracies)
                lines.append(
                    f"| {epsilon:g} | {batch_size} | {epochs} | {steps} | "
                    f"{noise_multiplier:.2f} | "
                    f"{noise_multiplier * CLIP_NORM / batch_size:.4f} | {mean:.1f}% | "
                    f"{per_seed} |"
                )
                print(lines[-1], flush=True)
                if mean > best.get(epsilon, (-1.0, 0, 0))[0]:
                    best[epsilon] = (mean, batch_size, epochs)
    elapsed = time.perf_counter() - start
    summary = "\n".join(
        f"- epsilon {e:g}: best {acc:.1f}% with batches of {b} for {n} epochs."
        for e, (acc, b, n) in best.items()
    )
    header = (
        "# DP-SGD tuning on digits: batch size x epochs per epsilon\n\n"
        f"- {datetime.datetime.now().isoformat(timespec='seconds')}; "
        f"{platform.processor() or platform.machine()}; {elapsed:.0f} s in all.\n"
        f"- `python benchmarks/tune_digits.py`: the CNN, loss, optimizer (SGD, momentum "
        f"0.9, learning rate 0.5) and clip norm ({CLIP_NORM}) of `examples/dp_digits.py`; "
        f"{num_examples} training examples; Poisson sampling; delta 1e-5; PLD "
        f"accounting; seeds {seeds}; the noise multiplier calibrated per row.\n\n"
    )
    text = f"{header}" + "\n".join(lines) + f"\n\n{summary}\n"
    print(summary)
    if not args.quick:
        RESULTS.write_text(text)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
