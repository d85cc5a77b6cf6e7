"""Benchmarks adaptive and automatic clipping against fixed clipping, per route.

The cost of the clipping rule alone: for the MLP 784-512-512-10 (669,706 parameters) and
the DP-SGD MNIST CNN (26,010 parameters) of `bench_grad.py`, at batch 256, one private
release (the clipped sum of per-example gradients plus its Gaussian noise) with

- a fixed clip norm (`plan.noisy_grad`, `dp.AbadiClipping`), the reference row;
- quantile-adaptive clipping (`plan.adaptive_noisy_grad`: the clip norm from the state,
  the noise scaled with it, the per-example norms counted and the clip norm updated);
- automatic clipping (`plan.noisy_grad` with `clipping_fn=dp.AutomaticClipping()`);

each through `dp.clipped_grad` (vmap, microbatches of 32) and `dp.ghost_clipped_grad`
(book-keeping, no microbatching). All rows of a table are timed round-robin in one
process (the order rotating every round) and reported as paired ratios to the fixed
clip norm of the same route in the same round. Target (from the issue): at most 3%
over fixed clipping.

Run `python benchmarks/bench_clipping.py` (about 5 minutes on 2 cores) or `--quick`.
Results go to `benchmarks/results/clipping.md` (`clipping-quick.md` with `--quick`).
"""

import argparse
import pathlib
import statistics
import sys

import equinox as eqx
import jax
from bench_dp import fmt_ratio, header, load_average, paired, Row, time_paired
from bench_grad import jit_arrays, make_batch, make_model, mean_loss, prepare, Variant

import eqx_micro.dp as dp


RESULTS = pathlib.Path(__file__).parent / "results"
TARGET = 1.03
TABLE_BUDGET_S = 60.0


def release(plan, noise_state, clip_state, model, x, y):
    if clip_state is None:
        return plan.noisy_grad(noise_state, model, x, y)[0]
    return plan.adaptive_noisy_grad(noise_state, clip_state, model, x, y)[0]


def make_row(name, route, batch, model, x, y, clipping):
    make = dp.clipped_grad if route == "vmap" else dp.ghost_clipped_grad
    microbatch_size = 32 if route == "vmap" else None
    clipping_fn = dp.AutomaticClipping() if clipping == "automatic" else dp.AbadiClipping()
    grad_fn = make(
        mean_loss,
        1.0,
        batch_argnums=(1, 2),
        normalize_by=batch,
        microbatch_size=microbatch_size,
        clipping_fn=clipping_fn,
    )
    adaptive = None
    if clipping == "adaptive":
        adaptive = dp.QuantileAdaptiveClipping(batch)
    plan = dp.DPSGDExecutionPlanConfig(
        iterations=1000,
        sampling_prob=0.01,
        noise_multiplier=1.0,
        noise_seed=0,
        adaptive_clipping=adaptive,
    ).make(grad_fn)
    params = eqx.filter(model, eqx.is_inexact_array)
    noise_state = plan.noise_addition_transform.init(params)
    clip_state = None
    if plan.adaptive_clipping is not None:
        clip_state = plan.adaptive_clipping.init(1.0)
    label = f"{route} {'mb=32' if microbatch_size else 'no mb'}: {clipping}"
    fun, args = jit_arrays(release, plan, noise_state, clip_state, model, x, y)
    return Row(Variant(label, str(microbatch_size), fun, args), clipping, microbatch_size)


def table(name: str, batch: int, max_rounds: int, budget_s: float) -> tuple[str, list]:
    model = make_model(name, jax.random.key(0))
    x, y = make_batch(name, batch, jax.random.key(1))
    rows = [
        make_row(name, route, batch, model, x, y, clipping)
        for route in ("vmap", "ghost")
        for clipping in ("fixed", "adaptive", "automatic")
    ]
    for row in rows:
        prepare(row.variant)
    load_before = load_average()
    rounds = time_paired(rows, max_rounds, budget_s)
    lines = [
        f"### {name.upper()} B={batch}",
        "",
        f"{rounds} rounds; load average (1/5/15 min) {load_before} before timing, "
        f"{load_average()} after.",
        "",
        "| route: clipping | median ms | x fixed, same route (IQR) | XLA temp MiB |",
        "|---|---:|---:|---:|",
    ]
    summary = []
    for i, row in enumerate(rows):
        fixed = rows[3 * (i // 3)].variant
        ratio = paired(row.variant, fixed)
        v = row.variant
        lines.append(
            f"| {v.name} | {statistics.median(v.times) * 1e3:,.1f} | {fmt_ratio(ratio, 3)} "
            f"| {v.temp_mib:,.1f} |"
        )
        if row.kind != "fixed":
            summary.append((name, batch, v.name, ratio))
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    return text, summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test")
    models = ["mlp", "cnn"]
    parser.add_argument("--models", nargs="+", choices=models, default=models)
    args = parser.parse_args(argv)
    batch = 32 if args.quick else 256
    max_rounds = 2 if args.quick else 30
    budget = 5.0 if args.quick else TABLE_BUDGET_S
    argv_text = "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    parts = [header(argv_text).replace("bench_dp.py", "bench_clipping.py")]
    summary = []
    for name in args.models:
        text, rows = table(name, batch, max_rounds, budget)
        parts.append(text)
        summary += rows
    lines = [
        "### Summary: x fixed clipping of the same route, paired median (IQR)",
        "",
        f"| model | B | row | x fixed | target <= {TARGET:.2f} |",
        "|---|---:|---|---:|---|",
    ]
    for name, b, label, ratio in summary:
        met = "yes" if ratio[0] <= TARGET else "no"
        lines.append(f"| {name} | {b} | {label} | {fmt_ratio(ratio, 3)} | {met} |")
    text = "\n".join(lines) + "\n"
    print(text)
    parts.append(text)
    parts.append(f"Load average (1/5/15 min) at the end: {load_average()}.\n")
    RESULTS.mkdir(exist_ok=True)
    output = f"clipping{'-quick' if args.quick else ''}.md"
    (RESULTS / output).write_text("\n".join(parts))


if __name__ == "__main__":
    main()
