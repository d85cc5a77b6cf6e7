"""Fixed, adaptive and automatic clipping on digits, at the same epsilon.

The model, data, loss, optimizer and (batch size, epochs) per epsilon are those of
`dp_digits`. Only the clipping differs:

- fixed clip norms from a grid (the best one is what a grid search would find, at the
  cost of one training run per grid point, whose privacy a real release must also pay);
- quantile-adaptive clipping (`dp.QuantileAdaptiveClipping`, Andrew et al. 2021): the
  clip norm starts at 1 and follows the median gradient norm from a privatized count,
  whose noise the plan takes out of the same epsilon;
- automatic clipping (`dp.AutomaticClipping`, Bu et al. 2023): every gradient scaled
  by `1 / (norm + 0.01)`, no clip norm.

    python -m examples clipping_digits --quick  # epsilon 8, one seed, a few epochs
    python -m examples clipping_digits          # epsilon 1, 2, 4, 8; 5 seeds; results/

The full run writes `examples/results/clipping_digits.md`.
"""

import pathlib
import time

import jax
import numpy as np

import eqx_micro.dp as dp
from examples._format import accuracy_text
from examples.dp_digits import (
    ACCOUNTANT,
    accuracy,
    Classifier,
    CNN,
    Data,
    DELTA,
    DP_OPTIMIZER,
    DP_SETTINGS,
    load_digits,
    loss,
    MICROBATCH_SIZE,
    padding_multiple,
)


FIXED_CLIP_NORMS = (0.3, 1.0, 3.0)
QUICK_SETTINGS = {8.0: (256, 3)}
SEEDS = (0, 1, 2, 3, 4)
RESULTS = pathlib.Path(__file__).parent / "results"


def train(
    train_data: Data,
    epsilon: float,
    seed: int,
    batch_size: int,
    epochs: int,
    clipping: str,
) -> tuple[Classifier, dp.PrivacyReport, float]:
    """One DP-SGD run; `clipping` is `"fixed C"`, `"adaptive"` or `"automatic"`.
    Returns the model, its report and the clip norm at the end."""
    num_examples = train_data["label"].shape[0]
    sampling_prob = batch_size / num_examples
    adaptive = None
    clip_norm, clipping_fn = 1.0, dp.AbadiClipping()
    if clipping.startswith("fixed"):
        clip_norm = float(clipping.split()[1])
    elif clipping == "adaptive":
        adaptive = dp.QuantileAdaptiveClipping(batch_size, target_unclipped_quantile=0.5)
    else:
        clipping_fn = dp.AutomaticClipping(0.01)
    # Each clipped gradient divided by its clip norm: the update's scale (and the
    # learning rate that suits it, tuned in `dp_digits` at clip norm 1) does not
    # depend on the clip norm, fixed or adapted, and the sensitivity is 1.
    grad_fn = dp.clipped_grad(
        loss,
        clip_norm,
        microbatch_size=MICROBATCH_SIZE,
        key_argnum=2,
        rescale_to_unit_norm=True,
        clipping_fn=clipping_fn,
    )
    plan = dp.DPSGDExecutionPlanConfig(
        iterations=round(epochs / sampling_prob),
        sampling_prob=sampling_prob,
        epsilon=epsilon,
        delta=DELTA,
        accountant=ACCOUNTANT,
        noise_seed=seed,  # Reproducible here; leave it None (secret) in a real release.
        adaptive_clipping=adaptive,
    ).make(grad_fn)
    trainer = dp.DPTrainer(plan, DP_OPTIMIZER, normalize_by=batch_size)
    model, report = trainer.fit(
        train_data,
        CNN(jax.random.key(seed)),
        rng=np.random.default_rng(seed),  # Secret and unseeded in a real release.
        key=jax.random.key(seed),
        delta=DELTA,
        padding_multiple=padding_multiple(batch_size),
        progress=False,
    )
    final_clip = clip_norm if report.l2_clip_norm is None else report.l2_clip_norm
    return model, report, float(final_clip)


def main(quick: bool = False) -> None:
    start = time.perf_counter()
    settings = QUICK_SETTINGS if quick else DP_SETTINGS
    seeds = (0,) if quick else SEEDS
    fixed = (1.0,) if quick else FIXED_CLIP_NORMS
    clippings = [f"fixed {c:g}" for c in fixed] + ["adaptive", "automatic"]
    train_data, test = load_digits()
    rows = []
    for epsilon, (batch_size, epochs) in settings.items():
        accuracies: dict[str, list[float]] = {}
        final_clips: dict[str, list[float]] = {}
        for clipping in clippings:
            for seed in seeds:
                model, report, clip = train(
                    train_data, epsilon, seed, batch_size, epochs, clipping
                )
                accuracies.setdefault(clipping, []).append(float(accuracy(model, test)))
                final_clips.setdefault(clipping, []).append(clip)
                assert report.epsilon <= epsilon + 1e-6
            print(
                f"epsilon {epsilon:g}, {clipping}: test accuracy "
                f"{accuracy_text(accuracies[clipping])} over {len(seeds)} seed(s)"
            )
        best_fixed = max(
            (c for c in clippings if c.startswith("fixed")),
            key=lambda c: np.mean(accuracies[c]),
        )
        for clipping in clippings:
            mark = " (best fixed)" if clipping == best_fixed else ""
            rows.append(
                f"| {epsilon:g} | {clipping}{mark} | "
                f"{accuracy_text(accuracies[clipping])} | "
                f"{np.mean(final_clips[clipping]):.3g} |"
            )
        gap = 100 * (np.mean(accuracies["adaptive"]) - np.mean(accuracies[best_fixed]))
        auto = 100 * (np.mean(accuracies["automatic"]) - np.mean(accuracies[best_fixed]))
        rows.append(
            f"| {epsilon:g} | adaptive − best fixed: {gap:+.1f} points; automatic − "
            f"best fixed: {auto:+.1f} points | | |"
        )
    table = "\n".join(
        [
            "| epsilon | clipping | test accuracy (mean ± std) | final clip norm |",
            "|---:|---|---|---:|",
            *rows,
        ]
    )
    print(table)
    if quick:
        print(
            "quick mode: one seed, few epochs, one fixed clip norm; a smoke test, not a "
            "measurement (run without --quick for the recorded numbers)."
        )
        print(f"total time {time.perf_counter() - start:.0f} s")
        return
    RESULTS.mkdir(exist_ok=True)
    header = (
        "# Fixed, adaptive and automatic clipping on digits\n\n"
        "`python -m examples clipping_digits`: DP-SGD as in `dp_digits` ((expected batch "
        f"size, epochs) per epsilon {settings}, delta {DELTA:g}, learning rate 0.5, "
        f"clipped gradients rescaled to unit norm), seeds {seeds}. Fixed clip norms "
        f"{FIXED_CLIP_NORMS}; adaptive: "
        "median target, learning rate 0.2, count noise stddev batch / 20, from clip "
        "norm 1, its count accounted in the same epsilon; automatic: gamma 0.01.\n\n"
    )
    (RESULTS / "clipping_digits.md").write_text(f"{header}{table}\n")
    print(f"wrote {RESULTS / 'clipping_digits.md'}")
    print(f"total time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
