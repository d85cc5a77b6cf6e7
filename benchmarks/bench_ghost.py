"""Benchmarks `dp.ghost_clipped_grad` (ghost norms + book-keeping) against the plain step.

Same models, data and measurement as `bench_grad.py` and `bench_dp.py` (imported from
them): an MLP 784-512-512-10 (669,706 parameters) and the DP-SGD MNIST CNN (26,010
parameters) at batch 256 and 1024, and a small pre-norm transformer block (learned
positions, 4-head `eqx.nn.MultiheadAttention`, LayerNorms, a 4x MLP; width 64, 32
tokens; 50,178 parameters) at batch 256. Clip norm 1, `normalize_by=batch`.

Rows of each table, all timed round-robin in one process (the order rotating every
round) and reported as paired ratios to the plain step of the same round:

- `plain value_and_grad`: `eqx.filter_value_and_grad` of the batch-mean loss (the
  non-private step, without the optimizer update);
- `eqx_micro ghost_clipped_grad`: the clipped sum of per-example gradients, with
  `method=dp.GhostMethod.BOOK_KEEPING` (the default) and, as a second row,
  `method=dp.GhostMethod.GHOST`;
- `eqx_micro clipped_grad`: the `vmap(grad)` path at its best microbatch size from
  `results/dp.md` (32), and unmicrobatched for the CNN and the transformer;
- `jax_privacy clipped_grad` at microbatch size 32 (MLP and CNN).

The `rel. err` column compares each DP row's clipped sum with `dp.clipped_grad`'s.
XLA temp memory is `memory_analysis().temp_size_in_bytes` of the compiled executable.
Opacus figures are not measured here (see `benchmarks/README.md`).

Run `python benchmarks/bench_ghost.py` (about 15 minutes on 2 cores) or `--quick` (a
smoke test); `--models mlp`, `--batches 256`. Results go to
`benchmarks/results/ghost.md` (`ghost-quick.md` with `--quick`).
"""

import argparse
import pathlib
import statistics
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from bench_dp import fmt_ratio, header, load_average, paired, Row, time_paired
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
TABLE_BUDGET_S = 60.0
# Targets from the issue: ghost x plain, and temp memory x plain (MLP only).
TARGET_RATIO = 1.5
TARGET_MEMORY = 2.0


class Block(eqx.Module):
    """A pre-norm transformer block on a sequence, then mean pooling and a head."""

    pos: jax.Array
    norm1: eqx.nn.LayerNorm
    attn: eqx.nn.MultiheadAttention
    norm2: eqx.nn.LayerNorm
    up: eqx.nn.Linear
    down: eqx.nn.Linear
    head: eqx.nn.Linear

    def __init__(self, key, length=32, width=64, heads=4, classes=10):
        k = jax.random.split(key, 5)
        self.pos = 0.02 * jax.random.normal(k[0], (length, width))
        self.norm1 = eqx.nn.LayerNorm(width)
        self.attn = eqx.nn.MultiheadAttention(heads, width, key=k[1])
        self.norm2 = eqx.nn.LayerNorm(width)
        self.up = eqx.nn.Linear(width, 4 * width, key=k[2])
        self.down = eqx.nn.Linear(4 * width, width, key=k[3])
        self.head = eqx.nn.Linear(width, classes, key=k[4])

    def __call__(self, x):
        x = x + self.pos
        h = jax.vmap(self.norm1)(x)
        x = x + self.attn(h, h, h)
        h = jax.vmap(self.norm2)(x)
        x = x + jax.vmap(self.down)(jax.nn.gelu(jax.vmap(self.up)(h)))
        return self.head(jnp.mean(x, axis=0))


def model_and_batch(name: str, batch: int):
    if name == "block":
        model = Block(jax.random.key(0))
        kx, ky = jax.random.split(jax.random.key(1))
        return model, (
            jax.random.normal(kx, (batch, 32, 64)),
            jax.random.randint(ky, (batch,), 0, 10),
        )
    return make_model(name, jax.random.key(0)), make_batch(name, batch, jax.random.key(1))


def plain_grad(model, x, y):
    return eqx.filter_value_and_grad(mean_loss)(model, x, y)


def clipped_sum(grad_fn, model, x, y):
    return grad_fn(model, x, y)[0]


def make_theirs(static, batch: int, microbatch_size: int | None):
    from jax_privacy import clipping

    return jax.jit(
        clipping.clipped_grad(
            lambda p, x, y: batch_of_one_loss(p, static, x, y),
            l2_clip_norm=CLIP_NORM,
            batch_argnums=(1, 2),
            microbatch_size=microbatch_size,
            normalize_by=batch,
        )
    )


def table(name: str, batch: int, max_rounds: int, budget_s: float, quick: bool) -> tuple:
    model, (x, y) = model_and_batch(name, batch)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    plain = Variant("plain value_and_grad", "-", *jit_arrays(plain_grad, model, x, y))
    rows = [Row(plain, "plain", None)]

    def ours(label, mb, make, **kwargs):
        grad_fn = make(
            mean_loss,
            CLIP_NORM,
            batch_argnums=(1, 2),
            normalize_by=batch,
            microbatch_size=mb,
            **kwargs,
        )
        variant = Variant(
            label,
            "none" if mb is None else str(mb),
            *jit_arrays(clipped_sum, grad_fn, model, x, y),
        )
        return variant

    ghost = ours("eqx_micro ghost_clipped_grad (book-keeping)", None, dp.ghost_clipped_grad)
    rows.append(Row(ghost, "ghost", None))
    ghost2 = ours(
        "eqx_micro ghost_clipped_grad (ghost)",
        None,
        dp.ghost_clipped_grad,
        method=dp.GhostMethod.GHOST,
    )
    rows.append(Row(ghost2, "ghost2", None))
    reference = ours("eqx_micro clipped_grad (vmap)", 32, dp.clipped_grad)
    rows.append(Row(reference, "vmap", 32))
    if name != "mlp" or quick:
        rows.append(
            Row(ours("eqx_micro clipped_grad (vmap)", None, dp.clipped_grad), "vmap", None)
        )
    if name != "block":
        theirs = Variant(
            "jax_privacy clipped_grad", "32", make_theirs(static, batch, 32), (params, x, y)
        )
        rows.append(Row(theirs, "theirs", 32))

    outs = {}
    for row in rows:
        outs[id(row)] = prepare(row.variant)
    ref_out = eqx.filter(outs[id(rows[3])], eqx.is_inexact_array)
    for row in rows[1:]:
        out = eqx.filter(outs[id(row)], eqx.is_inexact_array)
        row.variant.error = relative_error(out, ref_out)
    load_before = load_average()
    rounds = time_paired(rows, max_rounds, budget_s)
    load_after = load_average()
    lines = [
        f"### {name.upper()} B={batch}",
        "",
        f"{rounds} rounds; load average (1/5/15 min) {load_before} before timing, "
        f"{load_after} after.",
        "",
        "| variant | mb | median ms | x plain (IQR) | XLA temp MiB | x plain temp "
        "| compile s | rel. err |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        v = row.variant
        error = "" if np.isnan(v.error) else f"{v.error:.0e}"
        lines.append(
            f"| {v.name} | {v.microbatch} | {statistics.median(v.times) * 1e3:,.1f} | "
            f"{fmt_ratio(paired(v, plain))} | {v.temp_mib:,.1f} | "
            f"{v.temp_mib / max(plain.temp_mib, 1e-9):,.2f} | {v.compile_s:.2f} | {error} |"
        )
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    summary = {
        "model": name,
        "batch": batch,
        "ghost": paired(ghost, plain),
        "ghost2": paired(ghost2, plain),
        "vmap": paired(reference, plain),
        "theirs": paired(rows[-1].variant, plain) if rows[-1].kind == "theirs" else None,
        "plain_mib": plain.temp_mib,
        "ghost_mib": ghost.temp_mib,
        "ghost2_mib": ghost2.temp_mib,
        "vmap_mib": reference.temp_mib,
        "plain_ms": statistics.median(plain.times) * 1e3,
    }
    return text, summary


def summary_table(summary: list[dict]) -> str:
    lines = [
        "### Summary: x plain, paired median (IQR); temp MiB",
        "",
        "| model | B | plain ms | ghost (book-keeping) | ghost (2nd pass) | clipped_grad "
        "mb=32 | jax_privacy mb=32 | temp MiB plain / book-keeping / ghost / vmap "
        "| target met (book-keeping / ghost) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s in summary:
        theirs = "" if s["theirs"] is None else fmt_ratio(s["theirs"])
        verdicts = []
        for key, mib in (("ghost", "ghost_mib"), ("ghost2", "ghost2_mib")):
            met = s[key][0] <= TARGET_RATIO
            if s["model"] == "mlp":
                met = met and s[mib] <= TARGET_MEMORY * max(s["plain_mib"], 1e-9)
            verdicts.append("yes" if met else "no")
        verdict = "report only" if s["model"] == "block" else " / ".join(verdicts)
        lines.append(
            f"| {s['model']} | {s['batch']} | {s['plain_ms']:,.1f} "
            f"| {fmt_ratio(s['ghost'])} | {fmt_ratio(s['ghost2'])} "
            f"| {fmt_ratio(s['vmap'])} | {theirs} | {s['plain_mib']:,.1f} / "
            f"{s['ghost_mib']:,.1f} / {s['ghost2_mib']:,.1f} / {s['vmap_mib']:,.1f} "
            f"| {verdict} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test")
    parser.add_argument(
        "--models",
        nargs="+",
        choices=["mlp", "cnn", "block"],
        default=["mlp", "cnn", "block"],
    )
    parser.add_argument("--batches", nargs="+", type=int, help="default: 256 1024")
    parser.add_argument("--rounds", type=int, help="maximum rounds per table")
    parser.add_argument("--output", help="file name under results/")
    args = parser.parse_args(argv)
    batches = args.batches or ((32,) if args.quick else (256, 1024))
    max_rounds = args.rounds or (2 if args.quick else 12)
    budget = 5.0 if args.quick else TABLE_BUDGET_S
    argv_text = "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    parts = [header(argv_text).replace("bench_dp.py", "bench_ghost.py")]
    summary = []
    for name in args.models:
        for batch in batches:
            if name == "block" and batch > 256:
                continue  # one size for the transformer block
            text, row = table(name, batch, max_rounds, budget, args.quick)
            parts.append(text)
            summary.append(row)
    text = summary_table(summary)
    print(text, flush=True)
    parts.append(text)
    parts.append(f"Load average (1/5/15 min) at the end: {load_average()}.\n")
    RESULTS.mkdir(exist_ok=True)
    output = args.output or f"ghost{'-quick' if args.quick else ''}.md"
    (RESULTS / output).write_text("\n".join(parts))


if __name__ == "__main__":
    main()
