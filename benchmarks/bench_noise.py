"""Benchmarks the noise modules: `dp.BandMFNoise` against `dp.GaussianNoise`.

One noised update of an MLP-sized gradient PyTree (784-512-512-10, 669,706 parameters)
per call, jitted with the state donated (as in a training step), timed interleaved
round-robin so that the ratios are measured under the same load. For 1 (DP-SGD), 4, 16
and 64 bands it records the median time per update, the ratio to `GaussianNoise`, the
bytes of the noise state (the `num_bands - 1` past noises) and XLA's temp memory of the
compiled update.

Target (issue "DP II"): at 16 bands, at most 1.5x the Gaussian module's time.

Run `python benchmarks/bench_noise.py` (about a minute), `--quick` for a smoke test. The
report is printed and written to `benchmarks/results/noise.md`.
"""

import argparse
import datetime
import pathlib
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp

import eqx_micro.dp as dp


RESULTS = pathlib.Path(__file__).parent / "results"
MIB = 2**20
TARGET_RATIO_AT_16 = 1.5


def mlp_gradient_tree():
    model = eqx.nn.MLP(784, 10, 512, 2, key=jax.random.key(0))
    return eqx.filter(model, eqx.is_inexact_array)


def state_bytes(state) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(state) if eqx.is_array(x))


def main(quick: bool = False) -> str:
    grads = mlp_gradient_tree()
    params = sum(x.size for x in jax.tree.leaves(grads))
    bands = (1, 4, 16) if quick else (1, 4, 16, 64)
    repeats = 5 if quick else 30
    variants = {"GaussianNoise": dp.GaussianNoise(1.0, key=0)}
    for b in bands:
        coefs = jnp.ones(b) / jnp.sqrt(b)
        variants[f"BandMFNoise b={b}"] = dp.BandMFNoise(coefs, 1.0, key=0)

    # The state is donated, as in a training step: the ring buffer is updated in place.
    steps, states, temps = {}, {}, {}
    for name, noise in variants.items():
        step = jax.jit(lambda g, s, n=noise: n.update(g, s), donate_argnums=1)
        state = noise.init(grads)
        compiled = step.lower(grads, state).compile()
        temps[name] = compiled.memory_analysis().temp_size_in_bytes
        out, state = step(grads, state)  # compile and warm up
        jax.block_until_ready(out)
        steps[name], states[name] = step, state

    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name in variants:
            start = time.perf_counter()
            out, states[name] = steps[name](grads, states[name])
            jax.block_until_ready((out, states[name]))
            times[name].append(time.perf_counter() - start)

    base = statistics.median(times["GaussianNoise"])
    lines = [
        "# Noise modules: BandMF vs Gaussian",
        "",
        f"{datetime.date.today()}, {jax.devices()[0].platform}, jax {jax.__version__}; "
        f"MLP gradient PyTree of {params:,} float32 parameters; median of {repeats} "
        "interleaved updates.",
        "",
        "| module | time per update (ms) | ratio to Gaussian | state (MiB) "
        "| XLA temp (MiB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in variants:
        median = statistics.median(times[name])
        lines.append(
            f"| {name} | {1e3 * median:.2f} | {median / base:.2f} | "
            f"{state_bytes(states[name]) / MIB:.2f} | {temps[name] / MIB:.2f} |"
        )
    ratio_16 = statistics.median(times["BandMFNoise b=16"]) / base
    verdict = "met" if ratio_16 <= TARGET_RATIO_AT_16 else "NOT met"
    lines += [
        "",
        f"Target: BandMF at 16 bands <= {TARGET_RATIO_AT_16}x Gaussian: {ratio_16:.2f}x, "
        f"{verdict}.",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    name = "noise-quick.md" if quick else "noise.md"
    (RESULTS / name).write_text(report)
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    main(parser.parse_args().quick)
