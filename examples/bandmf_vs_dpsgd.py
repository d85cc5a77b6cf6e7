"""BandMF against DP-SGD on digits, at the same epsilon, steps and batch size.

The model, data and loss are those of `dp_digits`. Both mechanisms clip every
per-example gradient to the same norm, run the same number of steps with the same
expected batch size and optimizer, and are calibrated to the same (epsilon, delta) with
the same accountant and neighboring relation (zero-out, the dataset size is public).
Only the noise and the sampling differ:

- DP-SGD (`dp.DPSGDExecutionPlanConfig`): Poisson sampling from the whole dataset and
  independent Gaussian noise at every step;
- BandMF (`dp.BandMFExecutionPlanConfig`): the examples are split into `num_bands`
  groups, step `t` samples from group `t % num_bands` (cyclic Poisson sampling), and
  the noise is correlated over `num_bands` steps by an optimized banded Toeplitz
  strategy so that it partly cancels in the sum of the updates.

`dp.choose_num_bands` picks the band count with the least prefix-sum RMSE (the noise in
the running sum of updates, which is what SGD accumulates) for each epsilon. Batches of
128 leave room for several bands (each of the `num_bands` groups must hold a batch);
they are not DP-SGD's best setting on this data (`dp_digits` uses 512 at epsilon 8).

    python -m examples bandmf_vs_dpsgd --quick  # epsilon 8, one seed, a few epochs
    python -m examples bandmf_vs_dpsgd          # epsilon 2 and 8, 10 seeds; results/

The full run writes `examples/results/bandmf_vs_dpsgd.md` and `bandmf_vs_dpsgd.png`.
"""

import math
import pathlib
import time
from typing import Any

import dp_accounting
import jax
import numpy as np
from jaxtyping import Array

import eqx_micro.dp as dp
from examples._format import accuracy_text
from examples.dp_digits import (
    accuracy,
    CLIP_NORM,
    CNN,
    DELTA,
    DP_OPTIMIZER,
    load_digits,
    loss,
    MICROBATCH_SIZE,
)


# Per epsilon: (expected batch size, epochs). The same for both mechanisms.
SETTINGS = {2.0: (128, 12), 8.0: (128, 25)}
QUICK_SETTINGS = {8.0: (128, 3)}
RESULTS = pathlib.Path(__file__).parent / "results"
# PLD accounting under the zero-out relation (the dataset size is public), discretized
# at 0.01 instead of dp_accounting's 1e-4: a pessimistic (valid) bound on epsilon that
# calibrates in under a second instead of tens of seconds, with noise multipliers
# within 1e-4 of the fine grid's.
ACCOUNTANT = dp_accounting.pld.PLDAccountant(
    dp.NeighboringRelation.REPLACE_SPECIAL, value_discretization_interval=1e-2
)


def make_plan(
    num_examples: int,
    epsilon: float,
    batch_size: int,
    epochs: int,
    num_bands: int,
    seed: int,
    noise_multiplier: float | None,
) -> dp.DPExecutionPlan:
    """DP-SGD for `num_bands=1`, else BandMF: same steps, batch size and guarantee."""
    grad_fn = dp.clipped_grad(
        loss, CLIP_NORM, microbatch_size=MICROBATCH_SIZE, key_argnum=2, return_values=True
    )
    iterations = round(epochs * num_examples / batch_size)
    # Calibrated to (epsilon, DELTA), or at a noise multiplier found before.
    calibrate = noise_multiplier is None
    common: dict[str, Any] = dict(
        iterations=iterations,
        epsilon=epsilon if calibrate else None,
        delta=DELTA if calibrate else None,
        noise_multiplier=noise_multiplier,
        num_examples=num_examples,
        accountant=ACCOUNTANT,
        noise_seed=seed,
    )
    if num_bands == 1:
        sampling_prob = batch_size / num_examples
        config = dp.DPSGDExecutionPlanConfig(sampling_prob=sampling_prob, **common)
    else:
        group_size = num_examples // num_bands  # Equal groups; the rest never sampled.
        sampling_prob = min(1.0, batch_size / group_size)
        config = dp.BandMFExecutionPlanConfig(
            num_bands=num_bands, sampling_prob=sampling_prob, **common
        )
    return config.make(grad_fn)


def train(
    plan: dp.DPExecutionPlan, train_data: dict[str, Array], batch_size: int, seed: int
) -> tuple[CNN, dp.PrivacyReport]:
    trainer = dp.DPTrainer(plan, DP_OPTIMIZER, normalize_by=batch_size)
    # About four standard deviations of the batch size above its mean: one shape.
    spread = batch_size + 4 * np.sqrt(batch_size)
    padding_multiple = int(np.ceil(spread / MICROBATCH_SIZE)) * MICROBATCH_SIZE
    return trainer.fit(
        train_data,
        CNN(jax.random.key(seed)),
        rng=np.random.default_rng(seed),  # Secret and unseeded in a real release.
        key=jax.random.key(seed),
        delta=DELTA,
        padding_multiple=padding_multiple,
        progress=False,
    )


def table(rows: list[dict]) -> str:
    # The column names of `dp_digits`' table, so `benchmarks/plot_results.py` reads both.
    lines = [
        "| training | epsilon (delta 1e-5) | bands | steps | expected batch "
        "| noise multiplier | prefix-sum RMSE | test accuracy (mean ± std) | seeds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        accuracies = row["accuracies"]
        lines.append(
            f"| {row['mechanism']} | {row['epsilon']:g} | {row['bands']} | "
            f"{row['steps']} | {row['batch']} | {row['noise_multiplier']:.3f} | "
            f"{row['rmse']:.2f} | {accuracy_text(accuracies)} | {len(accuracies)} |"
        )
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """One line per epsilon: BandMF's accuracy and noise against DP-SGD's."""
    lines = []
    for dpsgd, bandmf in zip(rows[::2], rows[1::2]):
        # Paired by seed (same initialization and batch sampler), so the seed-to-seed
        # spread largely cancels in the difference.
        paired = 100 * (np.asarray(bandmf["accuracies"]) - np.asarray(dpsgd["accuracies"]))
        if len(paired) > 1:
            error = paired.std(ddof=1) / np.sqrt(len(paired))
            spread = f"paired over {len(paired)} seeds, standard error {error:.1f}"
        else:
            spread = "one seed: no standard error, so no comparison"
        lines.append(
            f"- epsilon {dpsgd['epsilon']:g}: BandMF ({bandmf['bands']} bands) "
            f"{_signed(paired.mean())} points against DP-SGD ({spread}), with a prefix-sum "
            f"RMSE {bandmf['rmse'] / dpsgd['rmse']:.0%} of DP-SGD's."
        )
    return "\n".join(lines)


def _signed(points: float) -> str:
    """`+1.1`, `-0.4`, and `+0.0` (not `-0.0`) for a difference that rounds to zero."""
    return f"{round(float(points), 1) + 0.0:+.1f}"


def write_results(rows: list[dict], text: str, seeds: tuple[int, ...]) -> None:
    RESULTS.mkdir(exist_ok=True)
    header = (
        "# BandMF against DP-SGD on scikit-learn's digits\n\n"
        "`python -m examples bandmf_vs_dpsgd`: the CNN, loss, clip norm "
        f"({CLIP_NORM}) and optimizer of `dp_digits`; per epsilon the same steps and "
        "expected batch size for both mechanisms, delta 1e-5, PLD accounting under "
        f"the zero-out relation; seeds {seeds}. BandMF's band count is "
        "`dp.choose_num_bands`'s (least prefix-sum RMSE).\n\n"
    )
    (RESULTS / "bandmf_vs_dpsgd.md").write_text(f"{header}{text}\n")
    plot(rows, RESULTS / "bandmf_vs_dpsgd.png")
    print(f"wrote {RESULTS / 'bandmf_vs_dpsgd.md'} and the plot")


def plot(rows: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for mechanism, marker in (("DP-SGD", "o"), ("BandMF", "s")):
        mine = [row for row in rows if row["mechanism"] == mechanism]
        eps = [row["epsilon"] for row in mine]
        means = [100 * np.mean(row["accuracies"]) for row in mine]
        stds = [100 * np.std(row["accuracies"]) for row in mine]
        ax.errorbar(eps, means, yerr=stds, marker=marker, capsize=3, label=mechanism)
    ax.set_xscale("log", base=2)
    eps = sorted({row["epsilon"] for row in rows})
    ax.set_xticks(eps, [f"{e:g}" for e in eps])
    ax.set_xlabel("epsilon (delta = 1e-5)")
    ax.set_ylabel("test accuracy (%)")
    seeds = len(rows[0]["accuracies"])
    ax.set_title(
        f"Digits, small CNN: BandMF vs DP-SGD\n(error bars: ± 1 std over {seeds} seeds)",
        fontsize=10,
    )
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(quick: bool = False) -> None:
    start = time.perf_counter()
    settings = QUICK_SETTINGS if quick else SETTINGS
    # Ten seeds: the two mechanisms differ by about a point, the seeds by two.
    seeds = (0,) if quick else tuple(range(10))
    train_data, test = load_digits()
    num_examples = train_data["label"].shape[0]
    rows = []
    for epsilon, (batch_size, epochs) in settings.items():
        iterations = round(epochs * num_examples / batch_size)
        if quick:
            num_bands = 2  # No search, in a few steps.
        else:
            num_bands, rmses = dp.choose_num_bands(
                iterations, num_examples, batch_size, epsilon, DELTA, accountant=ACCOUNTANT
            )
            choices = ", ".join(f"{b}: {r:.2f}" for b, r in rmses.items())
            print(f"epsilon {epsilon:g}: prefix-sum RMSE per band count {{{choices}}}")
        for mechanism, bands in (("DP-SGD", 1), ("BandMF", num_bands)):
            row = {"epsilon": epsilon, "mechanism": mechanism, "bands": bands}
            row.update(steps=iterations, batch=batch_size, accuracies=[])
            noise_multiplier = None  # Calibrated once, reused by the other seeds.
            rmse = math.nan
            for seed in seeds:
                plan = make_plan(
                    num_examples,
                    epsilon,
                    batch_size,
                    epochs,
                    bands,
                    seed,
                    noise_multiplier,
                )
                noise_multiplier = plan.noise_multiplier
                rmse = plan.prefix_sum_rmse()
                model, report = train(plan, train_data, batch_size, seed)
                row["accuracies"].append(float(accuracy(model, test)))
                print(
                    f"{mechanism} ({bands} band{'s' if bands > 1 else ''}), epsilon "
                    f"{epsilon:g}, seed {seed}: test accuracy "
                    f"{row['accuracies'][-1]:.1%}, epsilon spent {report.epsilon:.3f} "
                    f"({report.steps} steps, noise multiplier {noise_multiplier:.3f})"
                )
            row.update(noise_multiplier=noise_multiplier, rmse=rmse)
            rows.append(row)
    text = f"{table(rows)}\n\n{summary(rows)}"
    print(text)
    if quick:
        print(
            "quick mode: one seed, 2 bands, a few epochs: too short for BandMF's "
            "correlated noise to pay off, so not a comparison (run without --quick)."
        )
    if not quick:
        write_results(rows, text, seeds)
    print(f"total time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
