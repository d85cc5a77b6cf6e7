"""Benchmarks BandMF strategy optimization: `dp.optimize_banded_toeplitz` vs jax_privacy.

For each `(iterations, bands)` it times eqx_micro's optimizer on its first call (which
compiles the program for that pair) and warm (the compiled program reused, median of
three calls), and jax_privacy 2.0's `toeplitz.optimize_banded_toeplitz(n, bands,
max_optimizer_steps=500)` (what its `BandMFConfig.default` runs; it builds a new jitted
step on every call, so every call compiles). Both results are scored with the same
float64 `dp.banded_toeplitz_loss`, so "same loss reached" is checked, not assumed.

Run `python benchmarks/bench_bandmf.py` (about 6-15 minutes on 2 cores, almost all of
it jax_privacy at 10⁴ iterations), or `--quick` (about a minute). The markdown report is
printed and written to `benchmarks/results/bandmf.md` (`bandmf-quick.md` with
`--quick`).
"""

import argparse
import dataclasses
import datetime
import importlib.metadata
import os
import pathlib
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax_privacy.matrix_factorization import toeplitz

import eqx_micro.dp as dp
from eqx_micro.dp._noise import _banded_toeplitz as _bandmf_strategy


RESULTS = pathlib.Path(__file__).parent / "results"
JAX_PRIVACY_STEPS = 500
WARM_REPEATS = 5


@dataclasses.dataclass(frozen=True)
class Config:
    compared: tuple[tuple[int, int], ...]  # (iterations, bands), both libraries
    ours_only: tuple[tuple[int, int], ...]


FULL = Config(
    compared=tuple((1000, b) for b in (4, 8, 16, 32, 64))
    + tuple((10_000, b) for b in (16, 32, 64, 128)),
    ours_only=((100_000, 64),),
)
QUICK = Config(compared=((1000, 4), (1000, 16)), ours_only=((10_000, 64),))


@dataclasses.dataclass
class Row:
    iterations: int
    bands: int
    first_s: float
    warm_s: float
    steps: int
    stationarity: float
    rmse: float
    dpsgd_rmse: float
    theirs_s: float | None = None
    their_rmse: float | None = None


def _seconds(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - start, out


def measure_ours(iterations: int, bands: int) -> Row:
    first_s, coefs = _seconds(lambda: dp.optimize_banded_toeplitz(iterations, bands))
    warm = [
        _seconds(lambda: dp.optimize_banded_toeplitz(iterations, bands))[0]
        for _ in range(WARM_REPEATS)
    ]
    start = dp.sqrt_toeplitz_coefs(bands)
    # The same run as inside `optimize_banded_toeplitz` (cached), for its step count.
    _, steps, stationarity = _bandmf_strategy._run_minimize(
        start / np.linalg.norm(start), iterations, 500, 1e-8
    )
    return Row(
        iterations=iterations,
        bands=bands,
        first_s=first_s,
        warm_s=statistics.median(warm),
        steps=steps,
        stationarity=stationarity,
        rmse=dp.strategy_rmse(coefs, iterations),
        dpsgd_rmse=dp.strategy_rmse(np.ones(1), iterations),
    )


def measure_theirs(row: Row) -> None:
    seconds, coefs = _seconds(
        lambda: toeplitz.optimize_banded_toeplitz(
            row.iterations, row.bands, max_optimizer_steps=JAX_PRIVACY_STEPS
        )
    )
    row.theirs_s = seconds
    row.their_rmse = dp.strategy_rmse(np.asarray(coefs, np.float64), row.iterations)


def warm_up() -> None:
    """JAX's backend, optax and jax_privacy's imports: paid once, by neither side."""
    dp.optimize_banded_toeplitz(10, 2)
    jax.block_until_ready(toeplitz.optimize_banded_toeplitz(10, 2, max_optimizer_steps=2))


# --------------------------------------------------------------------------------------


def _fmt(x: float) -> str:
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}" if x >= 0.1 else f"{x:.3f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---:" for _ in header) + " |",
    ]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def results_table(rows: Sequence[Row]) -> list[str]:
    header = [
        "iterations",
        "bands",
        "eqx_micro first call s",
        "eqx_micro warm s",
        "L-BFGS steps",
        "jax_privacy s",
        "jax_privacy / eqx_micro first",
        "jax_privacy / eqx_micro warm",
        "RMSE eqx_micro",
        "RMSE rel. diff. (ours − theirs) / theirs",
        "RMSE / DP-SGD",
    ]
    cells = []
    for row in rows:
        compared = row.theirs_s is not None
        cells.append(
            [
                f"{row.iterations:,}",
                str(row.bands),
                _fmt(row.first_s),
                _fmt(row.warm_s),
                str(row.steps),
                _fmt(row.theirs_s) if compared else "–",
                f"{row.theirs_s / row.first_s:.1f}" if compared else "–",
                f"{row.theirs_s / row.warm_s:,.0f}" if compared else "–",
                f"{row.rmse:.6g}",
                f"{(row.rmse - row.their_rmse) / row.their_rmse:.1e}" if compared else "–",
                f"{row.rmse / row.dpsgd_rmse:.4f}",
            ]
        )
    return _table(header, cells)


def _cpu_model() -> str:
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _source_revision() -> str:
    """The git commit of the measured eqx_micro checkout, `+dirty` if edited."""
    root = pathlib.Path(dp.__file__).resolve().parent.parent.parent
    git = ["git", "-C", str(root)]
    try:
        commit = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, check=True
        )
        status = subprocess.run(
            [
                *git,
                "status",
                "--porcelain",
                "--",
                "eqx_micro/dp/_noise/_banded_toeplitz.py",
            ],
            capture_output=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    dirty = "+dirty" if status.stdout.strip() else ""
    return commit.stdout.decode().strip() + dirty


def report(rows: Sequence[Row], load: tuple[float, ...], quick: bool) -> str:
    packages = ("jax", "jaxlib", "optax", "scipy", "jax_privacy", "eqx_micro")
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in packages)
    loads = [", ".join(f"{x:.2f}" for x in xs) for xs in (load, os.getloadavg())]
    title = "# BandMF strategy optimization benchmark" + (" (`--quick`)" if quick else "")
    lines = [
        title,
        "",
        f"- {datetime.datetime.now().isoformat(timespec='seconds')}; {_cpu_model()}, "
        f"{os.cpu_count()} CPUs, JAX backend `{jax.default_backend()}`; load average "
        f"(1/5/15 min) {loads[0]} at start, {loads[1]} at end (this process included).",
        f"- {versions} (eqx_micro commit {_source_revision()}); Python "
        f"{platform.python_version()}.",
        "- eqx_micro: `dp.optimize_banded_toeplitz(iterations, bands)` (defaults: at most "
        "500 L-BFGS steps, `tol=1e-8`). *First call*: the first call for that pair in "
        "this process, compilation included; *warm*: the median of "
        f"{WARM_REPEATS} further calls (compiled program reused). *L-BFGS steps*: the "
        "steps it took before stopping.",
        "- jax_privacy: `toeplitz.optimize_banded_toeplitz(n, bands, "
        f"max_optimizer_steps={JAX_PRIVACY_STEPS})`, one call (it jits a new step "
        "function per call, so every call compiles; it has no early stop).",
        "- RMSE: `dp.strategy_rmse` (float64) of each result: the root-mean-squared error "
        "of the prefix sums per unit noise multiplier; DP-SGD's is `sqrt((n + 1) / 2)`. "
        "Both sides are timed after one warm-up call each on a tiny problem.",
        "",
        *results_table(rows),
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="three sizes, about a minute")
    parser.add_argument(
        "--output", type=pathlib.Path, help="markdown file to write (default: results/)"
    )
    options = parser.parse_args(argv)
    config = QUICK if options.quick else FULL
    output = options.output or RESULTS / (
        "bandmf-quick.md" if options.quick else "bandmf.md"
    )

    load = os.getloadavg()
    warm_up()
    rows = []
    for iterations, bands in config.compared + config.ours_only:
        row = measure_ours(iterations, bands)
        if (iterations, bands) in config.compared:
            measure_theirs(row)
        rows.append(row)
        print(row, flush=True)
    text = report(rows, load, options.quick)
    print(text)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)


if __name__ == "__main__":
    main()
