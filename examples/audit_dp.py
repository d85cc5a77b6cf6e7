"""Auditing DP-SGD on digits with canaries: an empirical lower bound on epsilon.

The model, data, loss and DP settings are those of `dp_digits`. Into each training run
go two kinds of canaries, each canary included independently with probability 1/2 (the
one-run design of Steinke, Nasr and Jagielski, 2023):

- gradient canaries (`dp.GradientCanaries`, white-box): rows whose gradient is a random
  direction in parameter space at the clip norm, scored by how far the run moved the
  model down that direction;
- input canaries (`dp.InputCanaries.mislabeled`, black-box): copies of training
  images with a wrong label, scored by minus their loss under the trained model.

`dp.audit` turns each run's scores into a lower bound on its epsilon at 95%
confidence. A bound above the claimed epsilon would mean a bug; a bound below it is
expected (one-run audits are loose, input canaries most of all) and proves nothing.

    python -m examples audit_dp --quick  # epsilon 8, a few epochs
    python -m examples audit_dp          # epsilon 1, 2, 4 and 8; writes results/

The full run writes `examples/results/audit_dp.md` (the table) and `audit_dp.png`.
"""

import pathlib
import time

import jax
import numpy as np

import eqx_micro.dp as dp
from examples.dp_digits import (
    ACCOUNTANT,
    accuracy,
    Classifier,
    CLIP_NORM,
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


QUICK_SETTINGS = {8.0: (256, 4)}
NUM_GRADIENT_CANARIES = 1000
NUM_INPUT_CANARIES = 200
SIGNIFICANCE = 0.05
RESULTS = pathlib.Path(__file__).parent / "results"


def audit_run(
    train: Data, epsilon: float, batch_size: int, epochs: int, seed: int, progress: bool
) -> tuple[dp.AuditReport, dp.AuditReport, dp.AuditReport, float, Classifier]:
    """One DP-SGD run with both kinds of canaries; its audits, noise and model."""
    keys = jax.random.split(jax.random.key(1000 + seed), 3)
    model = CNN(keys[0])
    # Input canaries first: the gradient canaries add a marker field they lack.
    inputs = dp.InputCanaries.mislabeled(
        NUM_INPUT_CANARIES, train, num_classes=10, key=keys[1]
    )
    # At the clip norm: clipping leaves them whole, the largest step one row may take.
    gradients = dp.GradientCanaries(
        NUM_GRADIENT_CANARIES, model, l2_norm=CLIP_NORM, key=keys[2]
    )
    data = gradients.insert(inputs.insert(train))
    num_examples = len(data["label"])
    # The steps of `dp_digits` (epochs over the real data), sampled from all rows.
    iterations = round(epochs * len(train["label"]) / batch_size)
    grad_fn = dp.clipped_grad(
        gradients.wrap_loss(loss),
        CLIP_NORM,
        microbatch_size=MICROBATCH_SIZE,
        key_argnum=2,
        return_values=True,
    )
    plan = dp.DPSGDExecutionPlanConfig(
        iterations=iterations,
        sampling_prob=batch_size / num_examples,
        epsilon=epsilon,
        delta=DELTA,
        accountant=ACCOUNTANT,
        noise_seed=seed,  # Reproducible here; leave it None (secret) in a real release.
    ).make(grad_fn)
    trainer = dp.DPTrainer(plan, DP_OPTIMIZER, normalize_by=batch_size)
    trained, report = trainer.fit(
        data,
        model,
        rng=np.random.default_rng(seed),
        key=jax.random.key(seed),
        delta=DELTA,
        padding_multiple=padding_multiple(batch_size),
        progress=progress,
    )
    gradient_scores = gradients.scores(model, trained)

    def audit(
        scores: tuple[np.ndarray, np.ndarray], method: dp.AuditMethod, label: str
    ) -> dp.AuditReport:
        in_scores, out_scores = scores
        return dp.audit(
            in_scores,
            out_scores,
            epsilon=report.epsilon,
            delta=DELTA,
            significance=SIGNIFICANCE,
            method=method,
            label=label,
        )

    one_run, fdp = dp.AuditMethod.ONE_RUN, dp.AuditMethod.ONE_RUN_FDP
    white_box = audit(gradient_scores, one_run, "gradient canaries")
    white_box_fdp = audit(gradient_scores, fdp, "gradient canaries, f-DP")
    black_box = audit(inputs.scores(trained, loss), one_run, "input canaries")
    return white_box, white_box_fdp, black_box, plan.noise_multiplier, trained


def table(rows: list[tuple[dp.AuditReport, dp.AuditReport, dp.AuditReport, float]]) -> str:
    lines = [
        "| claimed epsilon (delta 1e-5) | gradient canaries, one run | gradient "
        "canaries, one run f-DP | input canaries, one run | test accuracy |",
        "|---|---|---|---|---|",
    ]
    for white_box, white_box_fdp, black_box, test_accuracy in rows:
        lines.append(
            f"| {white_box.claimed_epsilon:.3g} | {white_box.epsilon_lower_bound:.2f} | "
            f"{white_box_fdp.epsilon_lower_bound:.2f} | "
            f"{black_box.epsilon_lower_bound:.2f} | {100 * test_accuracy:.1f}% |"
        )
    return "\n".join(lines)


def main(quick: bool = False) -> None:
    start = time.perf_counter()
    settings = QUICK_SETTINGS if quick else DP_SETTINGS
    train, test = load_digits()
    print(
        f"digits: {train['label'].shape[0]} training images, "
        f"{NUM_GRADIENT_CANARIES} gradient and {NUM_INPUT_CANARIES} input canaries "
        f"(about half of each included); bounds at {1 - SIGNIFICANCE:.0%} confidence"
    )
    rows = []
    for epsilon, (batch_size, epochs) in settings.items():
        white_box, white_box_fdp, black_box, noise, model = audit_run(
            train, epsilon, batch_size, epochs, seed=0, progress=not quick
        )
        test_accuracy = float(accuracy(model, test))
        rows.append((white_box, white_box_fdp, black_box, test_accuracy))
        print(
            f"epsilon {white_box.claimed_epsilon:.3f} (noise multiplier {noise:.3f}, "
            f"batch {batch_size}, {epochs} epochs): lower bounds "
            f"{white_box.epsilon_lower_bound:.2f} (gradient canaries), "
            f"{white_box_fdp.epsilon_lower_bound:.2f} (gradient canaries, f-DP), "
            f"{black_box.epsilon_lower_bound:.2f} (input canaries); test accuracy "
            f"{test_accuracy:.1%}"
        )
        for report in (white_box, white_box_fdp, black_box):
            if report.refutes_claim:
                print(f"  {report.label}: the bound exceeds the claim: a bug?")
    text = table(rows)
    print(text)
    if quick:
        print(
            "quick mode: epsilon 8 only, few epochs, one seed; a smoke test, not a "
            "measurement (run without --quick for the recorded numbers)."
        )
        print(f"total time {time.perf_counter() - start:.0f} s")
        return
    RESULTS.mkdir(exist_ok=True)
    header = (
        "# Auditing DP-SGD on digits with canaries\n\n"
        "`python -m examples audit_dp`: the DP-SGD runs of `dp_digits` ((expected "
        f"batch size, epochs) per epsilon {settings}, seed 0) with "
        f"{NUM_GRADIENT_CANARIES} gradient canaries at the clip norm and "
        f"{NUM_INPUT_CANARIES} mislabeled input canaries, each included with "
        "probability 1/2; one-run lower bounds on epsilon at "
        f"{1 - SIGNIFICANCE:.0%} confidence (`dp.audit`). A bound below the claim is "
        "expected and proves nothing; one above it would be a bug.\n\n"
    )
    (RESULTS / "audit_dp.md").write_text(f"{header}{text}\n")
    reports = [report for row in rows for report in row[:3]]
    reports[0].plot(RESULTS / "audit_dp.png", others=reports[1:])
    print(f"wrote {RESULTS / 'audit_dp.md'} and {RESULTS / 'audit_dp.png'}")
    print(f"total time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
