"""Benchmarks a full DP-SGD step and noise calibration in `eqx_micro.dp`.

Same models, data and measurement as `bench_grad.py` (imported from it): an MLP
784-512-512-10 (669,706 parameters) and the DP-SGD MNIST CNN (26,010 parameters), synthetic
data at batch 256 and 1024, clip norm 1, `optax.sgd` for the update.

Sections:

- `step`: one DP-SGD step, `plan.noisy_grad(noise_state, model, x, y,
  is_padding_example=...)` of a `dp.DPSGDExecutionPlanConfig(...).make(grad_fn)` plan
  (`grad_fn = dp.clipped_grad(...)`: clipped per-example gradient sum with
  `normalize_by=batch`, then Gaussian noise) followed by the `optax.sgd` update, at
  several microbatch sizes. Compared with the non-private step
  (`eqx.filter_value_and_grad` of the batch-mean loss and the same update) and with
  `jax_privacy.clipping.clipped_grad` + `jax_privacy.noise_addition.gaussian_privatizer`
  (same loss on `eqx.partition(model, eqx.is_inexact_array)`, same microbatch size, same
  noise standard deviation, same padding mask) + the same update. Extra rows at one
  microbatch size split the cost (the clipped sums alone, without noise or update; their
  agreement is the `rel. err` column) and time our step called through `eqx.filter_jit`
  (dispatch included; all other rows call the compiled executable).
- `calibration`: wall time of `dp.DPSGDExecutionPlanConfig(iterations=10_000,
  sampling_prob=q, epsilon=e, delta=1e-5).make(grad_fn)` with the PLD (default) and RDP
  accountants, against `dp_accounting.calibrate_dp_mechanism` called directly, as
  jax_privacy's execution plans call it (a fresh accountant per evaluation; its default
  tolerance 1e-6, and ours, 1e-3).

Every step is compiled once with `jax.jit(...).lower(...).compile()` (`eqx.filter_jit`
compiles the same program), its `memory_analysis().temp_size_in_bytes` read, and all
variants of a table are timed round-robin (the order rotating every round). A ratio is
the median over rounds of the two times measured in the same round, with its
interquartile range, so ratios are paired under the same machine load.

Run `python benchmarks/bench_dp.py` (about 20 minutes on 2 cores) or `--quick` (a smoke
test); `--section step` runs one section, `--models mlp` one model, `--batches 256`
one batch size and `--sizes 32 0` two microbatch sizes (0: none).
Results go to `benchmarks/results/dp.md` (`dp-quick.md` with `--quick`).
"""

import argparse
import copy
import dataclasses
import functools
import os
import pathlib
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import dp_accounting
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from bench_grad import (
    batch_of_one_loss,
    jit_arrays,
    make_batch,
    make_model,
    mean_loss,
    prepare,
    relative_error,
    Variant,
)

import eqx_micro.dp as dp


RESULTS = pathlib.Path(__file__).parent / "results"
CLIP_NORM = 1.0
LEARNING_RATE = 0.1
ITERATIONS = 10_000
DELTA = 1e-5
# The step's noise multiplier: its value does not change the program or its speed (the
# standard deviation is an array), so the step section does not calibrate.
NOISE_MULTIPLIER = 1.0
CALIBRATION_CASES = ((256 / 60_000, 1.0), (256 / 60_000, 8.0), (0.01, 2.0))
# Targets from the issue: ours / jax_privacy, paired median, at equal microbatch size.
TARGET_MLP_SPEEDUP = 3.0  # ours at least 3x faster on the MLP
TARGET_CNN_RATIO = 1.0  # ours no slower on the CNN
# A round of a table takes at most about this long before rounds are cut (at least
# MIN_ROUNDS are always run).
TABLE_BUDGET_S = 150.0
MIN_ROUNDS = 5
# jax_privacy's unmicrobatched MLP step at batch 1024 takes tens of seconds (see
# results/grad.md): not run.
SKIP_THEIRS = {("mlp", 1024, None)}

OPTIMIZER = optax.sgd(LEARNING_RATE)


# --------------------------------------------------------------------------------------
# The three steps.


def plain_step(model, opt_state, x, y):
    """The non-private step: gradient of the batch-mean loss, then SGD."""
    loss, grads = eqx.filter_value_and_grad(mean_loss)(model, x, y)
    updates, opt_state = OPTIMIZER.update(grads, opt_state)
    return eqx.filter(eqx.apply_updates(model, updates), eqx.is_array), opt_state, loss


def ours_step(plan, model, opt_state, noise_state, x, y, is_padding):
    """eqx_micro: one private release from the plan, then SGD."""
    grads, noise_state, _ = plan.noisy_grad(
        noise_state, model, x, y, is_padding_example=is_padding
    )
    updates, opt_state = OPTIMIZER.update(grads, opt_state)
    new_model = eqx.apply_updates(model, updates)
    return eqx.filter(new_model, eqx.is_array), opt_state, noise_state


def ours_clipped_sum(plan, model, x, y, is_padding):
    return plan.clipped_aggregation_fn(model, x, y, is_padding_example=is_padding)[0]


def make_theirs(static, batch: int, microbatch_size: int | None, stddev: float, seed: int):
    """jax_privacy's clipped sum, privatizer and step on the inexact-array params."""
    from jax_privacy import clipping, noise_addition

    grad_fn = clipping.clipped_grad(
        lambda p, x, y: batch_of_one_loss(p, static, x, y),
        l2_clip_norm=CLIP_NORM,
        batch_argnums=(1, 2),
        microbatch_size=microbatch_size,
        normalize_by=batch,
    )
    privatizer = noise_addition.gaussian_privatizer(stddev=stddev, prng_key=seed)

    def step(params, opt_state, noise_state, x, y, is_padding):
        grads = grad_fn(params, x, y, is_padding_example=is_padding)
        noisy, noise_state = privatizer.update(grads, noise_state)
        updates, opt_state = OPTIMIZER.update(noisy, opt_state)
        return optax.apply_updates(params, updates), opt_state, noise_state

    def clipped_sum(params, x, y, is_padding):
        return grad_fn(params, x, y, is_padding_example=is_padding)

    return step, clipped_sum, privatizer


def make_plan(batch: int, microbatch_size: int | None) -> dp.DPExecutionPlan:
    grad_fn = dp.clipped_grad(
        mean_loss,
        CLIP_NORM,
        batch_argnums=(1, 2),
        microbatch_size=microbatch_size,
        normalize_by=batch,
    )
    config = dp.DPSGDExecutionPlanConfig(
        iterations=ITERATIONS,
        sampling_prob=CALIBRATION_CASES[0][0],
        noise_multiplier=NOISE_MULTIPLIER,
        noise_seed=0,
    )
    return config.make(grad_fn)


# --------------------------------------------------------------------------------------
# Paired timing.


@dataclasses.dataclass
class Row:
    variant: Variant
    kind: str  # "plain", "ours", "theirs", "ours-sum", "theirs-sum", "ours-filter-jit"
    microbatch: int | None
    call: Callable | None = None  # overrides `variant.compiled(*variant.args)`

    def run(self) -> None:
        if self.call is not None:
            jax.block_until_ready(self.call())
        else:
            jax.block_until_ready(self.variant.compiled(*self.variant.args))


def time_paired(rows: list[Row], max_rounds: int, budget_s: float) -> int:
    """Times every row once per round, rotating the order; returns the rounds run."""
    rounds = 0
    start = time.perf_counter()
    while rounds < max_rounds:
        offset = rounds % len(rows)
        for row in rows[offset:] + rows[:offset]:
            t0 = time.perf_counter()
            row.run()
            row.variant.times.append(time.perf_counter() - t0)
        rounds += 1
        elapsed = time.perf_counter() - start
        if rounds >= MIN_ROUNDS and elapsed / rounds * (rounds + 1) > budget_s:
            break
    return rounds


def paired(a: Variant, b: Variant) -> tuple[float, float, float]:
    """Median and quartiles over rounds of `a`'s time over `b`'s in the same round."""
    ratios = [ta / tb for ta, tb in zip(a.times, b.times)]
    if len(ratios) == 1:
        return ratios[0], ratios[0], ratios[0]
    q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return median, q1, q3


def fmt_ratio(ratio: tuple[float, float, float], digits: int = 2) -> str:
    median, q1, q3 = ratio
    return f"{median:,.{digits}f} ({q1:,.{digits}f}-{q3:,.{digits}f})"


def load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


# --------------------------------------------------------------------------------------
# Sections.


def mb_label(microbatch_size: int | None) -> str:
    return "none" if microbatch_size is None else str(microbatch_size)


def step_section(
    model_name: str,
    batch: int,
    sizes: Sequence[int | None],
    split_size: int | None,
    max_rounds: int,
    budget_s: float,
    summary: list[dict],
) -> str:
    model = make_model(model_name, jax.random.key(0))
    x, y = make_batch(model_name, batch, jax.random.key(1))
    is_padding = jnp.zeros(batch, bool)  # Poisson batches are padded to a fixed shape.
    params, static = eqx.partition(model, eqx.is_inexact_array)
    opt_state = OPTIMIZER.init(eqx.filter(model, eqx.is_array))
    params_opt_state = OPTIMIZER.init(params)

    plain = Variant(
        "plain value_and_grad + sgd", "-", *jit_arrays(plain_step, model, opt_state, x, y)
    )
    rows = [Row(plain, "plain", None)]
    stddev = None
    for mb in sizes:
        label = mb_label(mb)
        plan = make_plan(batch, mb)
        stddev = float(plan.noise_addition_transform.stddev)
        noise_state = plan.noise_addition_transform.init(None)
        ours = Variant(
            "eqx_micro plan.noisy_grad + sgd",
            label,
            *jit_arrays(ours_step, plan, model, opt_state, noise_state, x, y, is_padding),
        )
        rows.append(Row(ours, "ours", mb))
        if mb == split_size:
            only = Variant(
                "eqx_micro clipped sum only",
                label,
                *jit_arrays(ours_clipped_sum, plan, model, x, y, is_padding),
            )
            rows.append(Row(only, "ours-sum", mb))
            jitted = eqx.filter_jit(ours_step)
            args = (plan, model, opt_state, noise_state, x, y, is_padding)
            via_filter_jit = Variant(
                "eqx_micro step via eqx.filter_jit", label, jitted, args
            )
            rows.append(
                Row(
                    via_filter_jit,
                    "ours-filter-jit",
                    mb,
                    call=lambda f=jitted, a=args: f(*a),
                )
            )
        if (model_name, batch, mb) in SKIP_THEIRS:
            skipped = Variant(
                "jax_privacy clipped_grad + privatizer + sgd", label, None, ()
            )
            skipped.note = "not run (tens of s a step)"
            rows.append(Row(skipped, "theirs", mb))
            continue
        step, clipped_sum, privatizer = make_theirs(static, batch, mb, stddev, seed=0)
        their_noise_state = privatizer.init(params)
        theirs = Variant(
            "jax_privacy clipped_grad + privatizer + sgd",
            label,
            jax.jit(step),
            (params, params_opt_state, their_noise_state, x, y, is_padding),
        )
        rows.append(Row(theirs, "theirs", mb))
        if mb == split_size:
            only = Variant(
                "jax_privacy clipped sum only",
                label,
                jax.jit(clipped_sum),
                (params, x, y, is_padding),
            )
            rows.append(Row(only, "theirs-sum", mb))

    runnable = [r for r in rows if r.variant.fun is not None]
    outs = {}
    for row in runnable:
        if row.kind == "ours-filter-jit":
            row.run()  # compiles through eqx.filter_jit's own cache
            continue
        outs[row.kind] = prepare(row.variant)
    sums = [outs.get("ours-sum"), outs.get("theirs-sum")]
    if all(s is not None for s in sums):
        ours_sum = eqx.filter(sums[0], eqx.is_inexact_array)
        error = relative_error(ours_sum, sums[1])
        for row in rows:
            if row.kind in ("ours-sum", "theirs-sum"):
                row.variant.error = error
    load_before = load_average()
    rounds = time_paired(runnable, max_rounds, budget_s)
    load_after = load_average()

    title = f"{model_name.upper()} B={batch}: DP-SGD step"
    text = render_step_table(title, rows, plain, stddev, rounds, load_before, load_after)
    for row in rows:
        if row.kind != "ours" or not row.variant.times:
            continue
        theirs = next(
            (r for r in rows if r.kind == "theirs" and r.microbatch == row.microbatch), None
        )
        summary.append(
            {
                "model": model_name,
                "batch": batch,
                "mb": mb_label(row.microbatch),
                "ours_x_plain": paired(row.variant, plain),
                "ours_vs_theirs": (
                    paired(row.variant, theirs.variant)
                    if theirs is not None and theirs.variant.times
                    else None
                ),
                "theirs_x_plain": (
                    paired(theirs.variant, plain)
                    if theirs is not None and theirs.variant.times
                    else None
                ),
                "ours_mib": row.variant.temp_mib,
                "theirs_mib": theirs.variant.temp_mib
                if theirs is not None
                else float("nan"),
                "plain_mib": plain.temp_mib,
            }
        )
    print(text, flush=True)
    return text


def render_step_table(title, rows, plain, stddev, rounds, load_before, load_after) -> str:
    lines = [
        f"### {title}",
        "",
        f"Noise stddev {stddev:.3g} (sigma {NOISE_MULTIPLIER:g} x clip / batch); "
        f"{rounds} rounds; "
        f"load average (1/5/15 min) {load_before} before timing, {load_after} after.",
        "",
        "| variant | mb | median ms | x plain (IQR) | ours / jax_privacy (IQR) "
        "| XLA temp MiB | compile s | rel. err |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        v = row.variant
        if not v.times:
            lines.append(f"| {v.name} | {v.microbatch} | {v.note} | | | | | |")
            continue
        vs_theirs = ""
        if row.kind == "ours":
            theirs = next(
                (r for r in rows if r.kind == "theirs" and r.microbatch == row.microbatch),
                None,
            )
            if theirs is not None and theirs.variant.times:
                vs_theirs = fmt_ratio(paired(v, theirs.variant), 3)
        if row.kind == "ours-sum":
            theirs = next((r for r in rows if r.kind == "theirs-sum"), None)
            if theirs is not None and theirs.variant.times:
                vs_theirs = fmt_ratio(paired(v, theirs.variant), 3)
        compile_s = "" if np.isnan(v.compile_s) else f"{v.compile_s:.2f}"
        temp = "" if np.isnan(v.temp_mib) else f"{v.temp_mib:,.1f}"
        error = "" if np.isnan(v.error) else f"{v.error:.0e}"
        lines.append(
            f"| {v.name} | {v.microbatch} | {statistics.median(v.times) * 1e3:,.1f} | "
            f"{fmt_ratio(paired(v, plain))} | {vs_theirs} | {temp} | {compile_s} | "
            f"{error} |"
        )
    return "\n".join(lines) + "\n"


def summary_table(summary: list[dict]) -> str:
    lines = [
        "### Summary: paired median (IQR)",
        "",
        "| model | B | mb | ours x plain | jax_privacy x plain | ours / jax_privacy "
        "| jax_privacy / ours | temp MiB ours / jax_privacy / plain |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summary:
        vs = s["ours_vs_theirs"]
        speedup = "" if vs is None else f"{1 / vs[0]:.2f}"
        lines.append(
            f"| {s['model'].upper()} | {s['batch']} | {s['mb']} | "
            f"{fmt_ratio(s['ours_x_plain'])} | "
            f"{'' if s['theirs_x_plain'] is None else fmt_ratio(s['theirs_x_plain'])} | "
            f"{'' if vs is None else fmt_ratio(vs, 3)} | {speedup} | "
            f"{s['ours_mib']:,.1f} / {s['theirs_mib']:,.1f} / {s['plain_mib']:,.1f} |"
        )
    lines += ["", targets(summary)]
    return "\n".join(lines) + "\n"


def targets(summary: list[dict]) -> str:
    out = []
    for model, check, wanted in (
        (
            "mlp",
            lambda r: r <= 1 / TARGET_MLP_SPEEDUP,
            f">= {TARGET_MLP_SPEEDUP:g}x faster",
        ),
        ("cnn", lambda r: r <= TARGET_CNN_RATIO, "no slower"),
    ):
        ratios = [
            (s["ours_vs_theirs"], s["batch"], s["mb"])
            for s in summary
            if s["model"] == model and s["ours_vs_theirs"] is not None
        ]
        if not ratios:
            continue
        worst = max(ratios, key=lambda r: r[0][0])
        met = all(check(r[0][0]) for r in ratios)
        within_noise = all(check(r[0][1]) for r in ratios)
        verdict = (
            "met"
            if met
            else ("within noise (lower quartile)" if within_noise else "NOT met")
        )
        out.append(
            f"- {model.upper()}: ours {wanted} than jax_privacy at every measured "
            f"(batch, mb): **{verdict}**; worst ours / jax_privacy "
            f"{fmt_ratio(worst[0], 3)} at B={worst[1]}, mb={worst[2]}."
        )
    return "\n".join(out)


def calibration_section(cases, iterations: int, accountant_names: Sequence[str]) -> str:
    grad_fn = dp.clipped_grad(mean_loss, CLIP_NORM, batch_argnums=(1, 2))
    relation = dp.NeighboringRelation.ADD_OR_REMOVE_ONE
    lines = [
        f"### Noise calibration: iterations={iterations:,}, delta={DELTA:g}, "
        f"{relation.name}",
        "",
        "| q | epsilon | accountant | method | sigma | seconds |",
        "|---:|---:|---|---|---:|---:|",
    ]
    accountants = {
        "pld": dp_accounting.pld.PLDAccountant(relation),
        "rdp": dp_accounting.rdp.RdpAccountant(neighboring_relation=relation),
    }
    for q, epsilon in cases:

        def make_event(sigma, q=q):
            return dp.dpsgd_event(sigma, iterations, sampling_prob=q)

        for name in accountant_names:
            accountant = accountants[name]
            config = dp.DPSGDExecutionPlanConfig(
                iterations=iterations,
                sampling_prob=q,
                epsilon=epsilon,
                delta=DELTA,
                accountant=dp.Accountant(name),
                noise_seed=0,
            )
            methods: list[tuple[str, Callable[[], float]]] = [
                ("eqx_micro `config.make(grad_fn)`", lambda c=config: c.make(grad_fn)),
            ]
            for tol, tol_name in ((1e-3, "1e-3, as ours"), (None, "default 1e-6")):
                methods.append(
                    (
                        f"`dp_accounting.calibrate_dp_mechanism` (tol {tol_name})",
                        lambda a=accountant, t=tol, e=epsilon: (
                            dp_accounting.calibrate_dp_mechanism(
                                make_fresh_accountant=functools.partial(copy.deepcopy, a),
                                make_event_from_param=make_event,
                                target_epsilon=e,
                                target_delta=DELTA,
                                tol=t,
                            )
                        ),
                    )
                )
            for method, run in methods:
                start = time.perf_counter()
                result = run()
                seconds = time.perf_counter() - start
                sigma = (
                    result.noise_multiplier
                    if hasattr(result, "noise_multiplier")
                    else result
                )
                lines.append(
                    f"| {q:.4g} | {epsilon:g} | {name} | {method} | {sigma:.6f} | "
                    f"{seconds:.2f} |"
                )
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    return text


def header(argv_text: str) -> str:
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=pathlib.Path(__file__).parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    import importlib.metadata as md

    versions = ", ".join(
        f"{p} {md.version(p)}"
        for p in ("jax", "jaxlib", "equinox", "optax", "jax_privacy", "dp-accounting")
    )
    return (
        f"{versions}; {os.cpu_count()} CPU cores; eqx_micro at `{commit}`; "
        f"`python benchmarks/bench_dp.py{argv_text}`; load average (1/5/15 min) at start "
        f"{load_average()}.\n"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test")
    parser.add_argument("--section", choices=["step", "calibration"])
    parser.add_argument(
        "--models", nargs="+", choices=["mlp", "cnn"], default=["mlp", "cnn"]
    )
    parser.add_argument("--batches", nargs="+", type=int, help="default: 256 1024")
    parser.add_argument(
        "--sizes", nargs="+", type=int, help="microbatch sizes, 0 for none (16 32 64 0)"
    )
    parser.add_argument("--rounds", type=int, help="maximum rounds per table")
    parser.add_argument("--output", help="file name under results/ (default dp.md)")
    args = parser.parse_args(argv)
    sections = [args.section] if args.section else ["step", "calibration"]
    batches = args.batches or ((32,) if args.quick else (256, 1024))
    max_rounds = args.rounds or (2 if args.quick else 30)
    budget = 5.0 if args.quick else TABLE_BUDGET_S
    argv_text = "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    parts = [header(argv_text)]
    summary: list[dict] = []
    if "step" in sections:
        for name in args.models:
            for batch in batches:
                sizes = args.sizes or ((8,) if args.quick else (16, 32, 64, 0))
                sizes = tuple(None if mb == 0 else mb for mb in sizes)
                split = 8 if args.quick else 32
                parts.append(
                    step_section(name, batch, sizes, split, max_rounds, budget, summary)
                )
        text = summary_table(summary)
        print(text, flush=True)
        parts.append(text)
    if "calibration" in sections:
        cases = CALIBRATION_CASES[:1] if args.quick else CALIBRATION_CASES
        # PLD calibration takes tens of seconds even at 100 iterations: RDP only in
        # the smoke test.
        names = ("rdp",) if args.quick else ("pld", "rdp")
        parts.append(calibration_section(cases, 100 if args.quick else ITERATIONS, names))
    parts.append(f"Load average (1/5/15 min) at the end: {load_average()}.\n")
    RESULTS.mkdir(exist_ok=True)
    output = args.output or f"dp{'-quick' if args.quick else ''}.md"
    (RESULTS / output).write_text("\n".join(parts))


if __name__ == "__main__":
    main()
