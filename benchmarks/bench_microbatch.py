"""Benchmarks `eqx_micro.microbatch` and `micro_vmap` against plain JAX and optax.

Three workloads whose whole batch fits in memory, so the plain (unmicrobatched) function
is the reference:

- `grad_accumulation`: the gradient of the mean softmax cross-entropy of an MLP
  784-512-512-10, accumulated with `Mean()` over microbatches
  (`microbatch(jax.grad(loss), argnums=(1, 2), ...)`), against `jax.grad(loss)`.
- `per_example_grad`: per-example input gradients (saliency maps, one `(784,)` array per
  example) of an MLP 784-2048-2048-10, concatenated with `micro_vmap(..., Concat())`,
  against `jax.vmap`. The saved activations of the backward pass dominate memory.
- `per_example_forward`: the per-example softmax of the same MLP, `micro_vmap` against
  `jax.vmap`. XLA:CPU fuses the whole forward pass into one YNNPACK kernel whose
  intermediates `memory_analysis()` does not count (see `benchmarks/README.md`).

For every microbatch size it records the median run time (all variants of a workload
interleaved round-robin in one process, so ratios to the plain function are measured
under the same load), the XLA temp memory of the compiled executable and the relative L2
error against the plain result. It also times `jax.jit(f).lower(*args).compile()` at 2,
8, 32 and 128 microbatches. Every measurement is repeated for `optax.microbatching`.

Run `python benchmarks/bench_microbatch.py` (about five minutes), or add `--quick` for a
smoke test under a minute (small sizes, few repeats). The markdown report is printed and
written to `benchmarks/results/microbatch.md` (`microbatch-quick.md` with `--quick`).
"""

import argparse
import dataclasses
import datetime
import functools
import importlib.metadata
import os
import pathlib
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import numpy as np
import optax
import optax.microbatching as omb

import eqx_micro as em


RESULTS = pathlib.Path(__file__).parent / "results"
IMPLEMENTATIONS = ("eqx_micro", "optax")
MIB = 2**20

# Acceptance targets (see benchmarks/README.md).
MAX_TIME_RATIO_AT_QUARTER = 1.10
MAX_COMPILE_RATIO = 1.2
MAX_FIXED_MEMORY_FRACTION = 0.1
MAX_FIT_RESIDUAL = 0.15
TIMING_NOISE = 0.05
MIN_REPEATS = 5


@dataclasses.dataclass(frozen=True)
class Config:
    batch: int
    microbatch_sizes: tuple[int, ...]
    repeats: int  # Timed calls per variant; fewer if they exceed `time_budget`.
    time_budget: float  # Seconds of timed calls per variant, at most.
    compile_counts: tuple[int, ...]  # Numbers of microbatches to time compilation at.
    compile_repeats: int  # Fresh compiles per point; the minimum is reported.
    width: int  # Hidden width of the per-example workloads' MLP.


FULL = Config(
    batch=1024,
    microbatch_sizes=(8, 32, 64, 128, 256, 512, 1024),
    repeats=20,
    time_budget=8.0,
    compile_counts=(2, 8, 32, 128),
    compile_repeats=2,
    width=2048,
)
QUICK = Config(
    batch=256,
    microbatch_sizes=(8, 64),
    repeats=5,
    time_budget=0.3,
    compile_counts=(2, 32),
    compile_repeats=1,
    width=256,
)


# --------------------------------------------------------------------------------------
# Workloads.


@dataclasses.dataclass(frozen=True)
class Workload:
    """A plain function and, per implementation, a factory of microbatched versions.

    Every factory call builds a new function object, so a fresh `jax.jit` of it traces
    and compiles from scratch (needed to time compilation).
    """

    name: str
    description: str
    args: tuple
    plain: Callable[[], Callable]
    microbatched: dict[str, Callable[[int], Callable]]


def _mlp(key: jax.Array, sizes: Sequence[int]) -> tuple[Any, Any]:
    """An `eqx.nn.MLP` split into (array parameters, static rest)."""
    mlp = eqx.nn.MLP(
        sizes[0], sizes[-1], width_size=sizes[1], depth=len(sizes) - 2, key=key
    )
    return eqx.partition(mlp, eqx.is_array)


def _data(key: jax.Array, batch: int) -> tuple[jax.Array, jax.Array]:
    xkey, ykey = jax.random.split(key)
    x = jax.random.normal(xkey, (batch, 784))
    y = jax.random.randint(ykey, (batch,), 0, 10)
    return x, y


def grad_accumulation(config: Config, key: jax.Array) -> Workload:
    mkey, dkey = jax.random.split(key)
    params, static = _mlp(mkey, (784, 512, 512, 10))

    def loss(params, x, y):
        logits = jax.vmap(eqx.combine(params, static))(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return Workload(
        name="grad_accumulation",
        description=(
            "`jax.grad` of the mean cross-entropy of an MLP 784-512-512-10 "
            "(669,706 parameters); `eqx_micro.microbatch(grad, argnums=(1, 2), "
            "accumulator=Mean())` vs `optax.microbatching.microbatch(grad, "
            "argnums=(1, 2), accumulator=MEAN)`"
        ),
        args=(params, *_data(dkey, config.batch)),
        plain=lambda: jax.grad(loss),
        microbatched={
            "eqx_micro": lambda mb: em.microbatch(
                jax.grad(loss),
                argnums=(1, 2),
                microbatch_size=mb,
                accumulator=em.Mean(),
            ),
            "optax": lambda mb: omb.microbatch(
                jax.grad(loss),
                argnums=(1, 2),
                microbatch_size=mb,
                accumulator=omb.AccumulationType.MEAN,
            ),
        },
    )


def _per_example_workload(
    name: str, description: str, fun: Callable, in_axes: tuple, args: tuple
) -> Workload:
    """`micro_vmap(fun)` (default `Concat()`) vs optax's `micro_vmap` vs `jax.vmap`."""
    return Workload(
        name=name,
        description=description
        + "; `eqx_micro.micro_vmap(fun, microbatch_size=mb)` (`Concat()`) vs "
        "`optax.microbatching.micro_vmap(fun, microbatch_size=mb)` vs `jax.vmap(fun)`",
        args=args,
        plain=lambda: jax.vmap(fun, in_axes=in_axes),
        microbatched={
            "eqx_micro": lambda mb: em.micro_vmap(fun, in_axes=in_axes, microbatch_size=mb),
            "optax": lambda mb: omb.micro_vmap(fun, in_axes=in_axes, microbatch_size=mb),
        },
    )


def per_example_grad(config: Config, key: jax.Array) -> Workload:
    mkey, dkey = jax.random.split(key)
    params, static = _mlp(mkey, (784, config.width, config.width, 10))

    def input_gradient(params, x, y):
        def loss(x):
            logits = eqx.combine(params, static)(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y)

        return jax.grad(loss)(x)

    return _per_example_workload(
        "per_example_grad",
        "per-example input gradient (784,) of the cross-entropy of an MLP "
        f"784-{config.width}-{config.width}-10",
        input_gradient,
        (None, 0, 0),
        (params, *_data(dkey, config.batch)),
    )


def per_example_forward(config: Config, key: jax.Array) -> Workload:
    mkey, dkey = jax.random.split(key)
    params, static = _mlp(mkey, (784, config.width, config.width, 10))

    def predict(params, x):
        return jax.nn.softmax(eqx.combine(params, static)(x))

    return _per_example_workload(
        "per_example_forward",
        f"per-example softmax (10,) of an MLP 784-{config.width}-{config.width}-10",
        predict,
        (None, 0),
        (params, _data(dkey, config.batch)[0]),
    )


WORKLOADS = (grad_accumulation, per_example_grad, per_example_forward)


# --------------------------------------------------------------------------------------
# Measurements.


@dataclasses.dataclass
class Variant:
    """One compiled function of a workload and what was measured about it."""

    implementation: str  # "plain" or one of `IMPLEMENTATIONS`
    microbatch_size: int
    compiled: Any
    temp_mib: float
    rel_error: float = 0.0
    times: list[float] = dataclasses.field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return 1e3 * statistics.median(self.times)


def _paired(variant: Variant, reference: Variant) -> tuple[float, float, float]:
    """Quartiles of `variant`'s call time over `reference`'s in the same round."""
    ratios = [a / b for a, b in zip(variant.times, reference.times)]
    low, median, high = np.percentile(ratios, [25, 50, 75])
    return float(low), float(median), float(high)


@dataclasses.dataclass
class Result:
    """Everything measured for one workload."""

    workload: Workload
    plain: Variant
    microbatched: dict[tuple[str, int], Variant]  # (implementation, mb) -> variant
    compile_s: dict[tuple[str, int], tuple[float, float]]  # -> (lower s, compile s)

    def variant(self, implementation: str, mb: int) -> Variant:
        return self.microbatched[implementation, mb]

    def time_ratio(self, implementation: str, mb: int) -> float:
        """Median over rounds of the variant's time over the plain function's."""
        return _paired(self.variant(implementation, mb), self.plain)[1]

    def paired_ratio(self, mb: int) -> tuple[float, float, float]:
        """Quartiles over rounds of eqx_micro's time over optax's."""
        return _paired(self.variant("eqx_micro", mb), self.variant("optax", mb))

    @property
    def compile_counts(self) -> list[int]:
        return sorted(n for impl, n in self.compile_s if impl == IMPLEMENTATIONS[0])

    def compile_ratio(self, implementation: str) -> float:
        """Compile time at the most microbatches over that at the fewest."""
        first, *_, last = self.compile_counts
        seconds = lambda count: sum(self.compile_s[implementation, count])
        return seconds(last) / seconds(first)


def compile_fresh(make: Callable[[], Callable], args: tuple) -> tuple[Any, float, float]:
    """Traces, lowers and compiles a new function object; returns it and both times."""
    fun = make()
    start = time.perf_counter()
    lowered = jax.jit(lambda *a: fun(*a)).lower(*args)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    return compiled, lowered_at - start, time.perf_counter() - lowered_at


def best_compile(
    make: Callable[[], Callable], args: tuple, repeats: int
) -> tuple[float, float]:
    """(trace+lower s, compile s) of the fastest of `repeats` fresh compiles."""
    samples = [compile_fresh(make, args)[1:] for _ in range(repeats)]
    return min(samples, key=sum)


def temp_mib(compiled: Any) -> float:
    return compiled.memory_analysis().temp_size_in_bytes / MIB


def _flat(tree: Any) -> np.ndarray:
    leaves = jax.tree.leaves(tree)
    return np.concatenate([np.ravel(np.asarray(leaf, np.float64)) for leaf in leaves])


def relative_error(actual: Any, expected: Any) -> float:
    expected = _flat(expected)
    return float(np.linalg.norm(_flat(actual) - expected) / np.linalg.norm(expected))


def call_seconds(compiled: Any, args: tuple) -> float:
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    return time.perf_counter() - start


def build_variants(workload: Workload, config: Config) -> tuple[Variant, dict]:
    """Compiles the plain function and every microbatched one; checks their results."""
    compiled = compile_fresh(workload.plain, workload.args)[0]
    plain = Variant("plain", config.batch, compiled, temp_mib(compiled))
    expected = compiled(*workload.args)
    microbatched = {}
    for mb in config.microbatch_sizes:
        for implementation, factory in workload.microbatched.items():
            compiled = compile_fresh(functools.partial(factory, mb), workload.args)[0]
            error = relative_error(compiled(*workload.args), expected)
            microbatched[implementation, mb] = Variant(
                implementation, mb, compiled, temp_mib(compiled), error
            )
    return plain, microbatched


def time_round_robin(variants: Sequence[Variant], args: tuple, config: Config) -> None:
    """Times all variants interleaved: one call of each per round, in a shuffled order.

    A variant gets `config.repeats` calls, or fewer (at least `MIN_REPEATS`) if those
    would take more than `config.time_budget` seconds, as estimated from a call after
    warm-up. Call `i` of every variant is made in round `i`, so calls of two variants
    with the same index were made close together in time (see `paired_ratio`).
    """
    quotas = []
    for variant in variants:
        call_seconds(variant.compiled, args)  # Warm-up.
        estimate = call_seconds(variant.compiled, args)
        affordable = int(config.time_budget / max(estimate, 1e-9))
        quotas.append(max(MIN_REPEATS, min(config.repeats, affordable)))
    rng = np.random.default_rng(0)
    for round_ in range(max(quotas)):
        for i in rng.permutation(len(variants)):
            if round_ < quotas[i]:
                variants[i].times.append(call_seconds(variants[i].compiled, args))


def compile_times(workload: Workload, config: Config) -> dict:
    """(trace+lower s, compile s) per (implementation, number of microbatches)."""
    repeats = config.compile_repeats
    times = {("plain", 1): best_compile(workload.plain, workload.args, repeats)}
    for implementation, factory in workload.microbatched.items():
        for count in config.compile_counts:
            make = functools.partial(factory, config.batch // count)
            times[implementation, count] = best_compile(make, workload.args, repeats)
    return times


def measure(workload: Workload, config: Config) -> Result:
    jax.block_until_ready(workload.args)
    plain, microbatched = build_variants(workload, config)
    time_round_robin([plain, *microbatched.values()], workload.args, config)
    return Result(workload, plain, microbatched, compile_times(workload, config))


# --------------------------------------------------------------------------------------
# Targets.


def memory_fit(result: Result, implementation: str = "eqx_micro") -> tuple:
    """Least-squares `temp ≈ fixed + per_example * mb` over the looped sizes.

    Returns (fixed MiB, per-example KiB, largest relative residual).
    """
    batch = result.plain.microbatch_size
    sizes = [mb for impl, mb in result.microbatched if impl == implementation]
    sizes = [mb for mb in sizes if mb < batch]  # Two microbatches or more.
    temps = np.array([result.variant(implementation, mb).temp_mib for mb in sizes])
    slope, fixed = np.polyfit(np.array(sizes, float), temps, 1)
    fitted = fixed + slope * np.array(sizes)
    residual = float(np.max(np.abs(temps - fitted) / temps))
    return float(fixed), float(slope * 1024), residual


def _verdict(met: bool, near: bool = False) -> str:
    if met:
        return "yes"
    return "within noise" if near else "**no**"


def _speed_target(result: Result, batch: int) -> list[tuple[str, str, str]]:
    quarter, limit = batch // 4, MAX_TIME_RATIO_AT_QUARTER
    if ("eqx_micro", quarter) not in result.microbatched:
        return []
    ratio = result.time_ratio("eqx_micro", quarter)
    return [
        (
            f"time at mb = batch/4 = {quarter} ≤ {limit:.2f} × plain (within noise: "
            f"≤ {limit + TIMING_NOISE:.2f})",
            f"{ratio:.3f}× (optax {result.time_ratio('optax', quarter):.3f}×)",
            _verdict(ratio <= limit, ratio <= limit + TIMING_NOISE),
        )
    ]


def _memory_target(result: Result) -> list[tuple[str, str, str]]:
    fixed, per_example, residual = memory_fit(result)
    fraction = fixed / max(result.plain.temp_mib, 1e-9)
    met = fraction <= MAX_FIXED_MEMORY_FRACTION and residual <= MAX_FIT_RESIDUAL
    return [
        (
            "temp ∝ mb: fit `fixed + per-example × mb` (2+ microbatches) with "
            f"fixed ≤ {MAX_FIXED_MEMORY_FRACTION:g} × plain temp, residual ≤ "
            f"{MAX_FIT_RESIDUAL:.0%}",
            f"{fixed:.2f} MiB + {per_example:.1f} KiB × mb; fixed = {fraction:.2g} × "
            f"plain ({_fmt(result.plain.temp_mib)} MiB); residual {residual:.0%}",
            _verdict(met),
        )
    ]


def _compile_targets(result: Result) -> list[tuple[str, str, str]]:
    first, *_, last = result.compile_counts
    rows = []
    for implementation in IMPLEMENTATIONS:
        ratio = result.compile_ratio(implementation)
        target = (
            f"{implementation} compile({last} mb) / compile({first} mb) ≤ "
            f"{MAX_COMPILE_RATIO}"
        )
        rows.append((target, f"{ratio:.3f}", _verdict(ratio <= MAX_COMPILE_RATIO)))
    return rows


def _optax_target(result: Result) -> list[tuple[str, str, str]]:
    ratios = {mb: result.paired_ratio(mb) for _, mb in result.microbatched}
    worst = max(ratios, key=lambda mb: ratios[mb][1])
    low, median, high = ratios[worst]
    return [
        (
            "never slower than optax: max over mb of the paired median "
            "eqx_micro / optax ≤ 1 (within noise: lower quartile ≤ 1)",
            f"{median:.3f} (IQR {low:.2f}–{high:.2f}; mb = {worst})",
            _verdict(median <= 1, low <= 1),
        )
    ]


def target_rows(result: Result, batch: int) -> list[list[str]]:
    """One row per acceptance target: workload, target, measured, met?"""
    rows = [
        *_speed_target(result, batch),
        *_memory_target(result),
        *_compile_targets(result),
        *_optax_target(result),
    ]
    return [[f"`{result.workload.name}`", *row] for row in rows]


# --------------------------------------------------------------------------------------
# Report.


def _fmt(x: float) -> str:
    """Three significant digits (at least the units), or `1e-07` style when tiny."""
    if x == 0:
        return "0"
    if abs(x) < 1e-3:
        return f"{x:.0e}"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:#.3g}"


def _row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def _table(header: Sequence[str], align: str, rows: Sequence[Sequence[Any]]) -> list:
    """A markdown table; `align` has one `l` or `r` per column."""
    rule = ["---" if a == "l" else "---:" for a in align]
    return [_row(header), _row(rule), *(_row(row) for row in rows)]


SPEED_HEADER = (
    "mb",
    "#mb",
    "eqx_micro ms",
    "× plain, paired",
    "optax ms",
    "× plain, paired",
    "eqx_micro / optax, paired (IQR)",
    "n",
    "eqx_micro temp MiB",
    "optax temp MiB",
    "eqx_micro rel. err",
    "optax rel. err",
)


def speed_memory_table(result: Result, batch: int) -> list[str]:
    rows = []
    for mb in sorted({mb for _, mb in result.microbatched}):
        ours, theirs = result.variant("eqx_micro", mb), result.variant("optax", mb)
        rows.append(
            [
                mb,
                batch // mb,
                _fmt(ours.median_ms),
                f"{result.time_ratio('eqx_micro', mb):.2f}",
                _fmt(theirs.median_ms),
                f"{result.time_ratio('optax', mb):.2f}",
                "{1:.2f} ({0:.2f}–{2:.2f})".format(*result.paired_ratio(mb)),
                f"{len(ours.times)}/{len(theirs.times)}",
                _fmt(ours.temp_mib),
                _fmt(theirs.temp_mib),
                f"{ours.rel_error:.0e}",
                f"{theirs.rel_error:.0e}",
            ]
        )
    return _table(SPEED_HEADER, "r" * len(SPEED_HEADER), rows)


def compile_table(results: Sequence[Result]) -> list[str]:
    counts = results[0].compile_counts
    header = ["workload", "implementation", *(f"{n} mb" for n in counts)]
    header.append(f"{counts[-1]} / {counts[0]}")
    cell = "{:.2f} / {:.2f}".format
    rows = []
    for result in results:
        name = f"`{result.workload.name}`"
        plain = cell(*result.compile_s["plain", 1])
        rows.append([name, "plain (1 mb)", plain, *[""] * len(counts)])
        for implementation in IMPLEMENTATIONS:
            cells = [cell(*result.compile_s[implementation, n]) for n in counts]
            ratio = f"{result.compile_ratio(implementation):.2f}"
            rows.append([name, implementation, *cells, ratio])
    return _table(header, "ll" + "r" * (len(header) - 2), rows)


def _cpu_model() -> str:
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _source_revision() -> str:
    """The git commit of the measured eqx_micro checkout, `+dirty` if edited."""
    root = pathlib.Path(em.__file__).resolve().parent.parent
    git = ["git", "-C", str(root)]
    try:
        commit = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, check=True
        )
        status = subprocess.run(
            [*git, "status", "--porcelain", "--", "eqx_micro"],
            capture_output=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    dirty = "+dirty" if status.stdout.strip() else ""
    return commit.stdout.decode().strip() + dirty


def machine_info(config: Config, load: tuple[float, ...]) -> list[str]:
    packages = ("jax", "jaxlib", "equinox", "optax", "eqx_micro")
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in packages)
    loads = [", ".join(f"{x:.2f}" for x in xs) for xs in (load, os.getloadavg())]
    return [
        f"- {datetime.datetime.now().isoformat(timespec='seconds')}; {_cpu_model()}, "
        f"{os.cpu_count()} CPUs, JAX backend `{jax.default_backend()}` "
        f"({jax.device_count()} device); load average (1/5/15 min) {loads[0]} at "
        f"start, {loads[1]} at end (this process included).",
        f"- {versions} (commit {_source_revision()}); Python {platform.python_version()}.",
        f"- Time: median of n calls (eqx_micro/optax) per variant; all variants of a "
        "workload are called round-robin, one call each per round in a shuffled "
        f"order; n = {config.repeats}, or as many as fit in {config.time_budget:g} s "
        f"(at least {MIN_REPEATS}). Ratios are paired: per round, one call's time "
        "over the other's in the same round; the median (and interquartile range) "
        "over rounds. Temp: XLA `temp_size_in_bytes` of the compiled executable. "
        "Rel. err: relative L2 error against the plain result.",
    ]


def report(
    config: Config, results: Sequence[Result], load: tuple[float, ...], quick: bool
) -> str:
    title = "# eqx_micro microbatching benchmark" + (" (`--quick`)" if quick else "")
    lines = [title, "", *machine_info(config, load), ""]
    for result in results:
        plain = result.plain
        lines += [
            f"## `{result.workload.name}` (batch {config.batch})",
            "",
            result.workload.description + ".",
            f"Plain: {_fmt(plain.median_ms)} ms (n = {len(plain.times)}), temp "
            f"{_fmt(plain.temp_mib)} MiB.",
            "",
            *speed_memory_table(result, config.batch),
            "",
        ]
    lines += [
        f"## Compile time (s: trace+lower / XLA compile; min of "
        f"{config.compile_repeats}; batch {config.batch}, mb = batch / #mb)",
        "",
        *compile_table(results),
        "",
        "## Targets",
        "",
    ]
    rows = [row for result in results for row in target_rows(result, config.batch)]
    lines += _table(["workload", "target", "measured", "met"], "llll", rows)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="small sizes and few repeats (< 1 min)"
    )
    parser.add_argument(
        "--output", type=pathlib.Path, help="markdown file to write (default: results/)"
    )
    options = parser.parse_args(argv)
    config = QUICK if options.quick else FULL
    output = options.output or RESULTS / (
        "microbatch-quick.md" if options.quick else "microbatch.md"
    )

    load = os.getloadavg()
    keys = jax.random.split(jax.random.key(0), len(WORKLOADS))
    results = [
        measure(make(config, key), config)
        for make, key in zip(WORKLOADS, keys, strict=True)
    ]
    text = report(config, results, load, options.quick)
    print(text)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)


if __name__ == "__main__":
    main()
