"""Draws the plots of the documentation's benchmark page from the recorded results.

Reads the Markdown tables that the benchmark scripts and the DP examples wrote
(`benchmarks/results/*.md`, `examples/results/*.md`) and writes PNGs to `docs/images/`:

- `memory_vs_microbatch.png`: XLA temp memory against the microbatch size, eqx_micro
  against optax (`bench_microbatch.py`) and, for the clipped per-example gradient sum,
  jax_privacy (`bench_grad.py`);
- `time_vs_microbatch.png`: the same runs' time as a multiple of the plain function;
- `privacy_utility.png`: test accuracy against epsilon on scikit-learn's digits
  (`examples/dp_digits.py`, and `examples/bandmf_vs_dpsgd.py` when its results exist),
  with the non-private accuracy.

Run `python benchmarks/plot_results.py` after re-running a benchmark or an example
(needs matplotlib, in the `examples` extra). Nothing is measured here: the numbers are
the recorded ones, so the plots always match the tables on the same page.
"""

import argparse
import pathlib
import re

import matplotlib
import matplotlib.ticker


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
EXAMPLE_RESULTS = ROOT / "examples" / "results"
IMAGES = ROOT / "docs" / "images"


def read_tables(path: pathlib.Path) -> dict[str, list[dict[str, str]]]:
    """`{heading: rows}` for every Markdown table in `path`, each row a column->cell dict.

    A table is keyed by the nearest heading above it; a second table under the same
    heading gets ` (2)` appended, and so does a repeated column name.
    """
    tables: dict[str, list[dict[str, str]]] = {}
    heading = ""
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif (
            line.startswith("|") and i + 1 < len(lines) and set(lines[i + 1]) <= set("|-: ")
        ):
            header = _unique(_cells(line))
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(dict(zip(header, _cells(lines[i]))))
                i += 1
            key, n = heading, 2
            while key in tables:
                key, n = f"{heading} ({n})", n + 1
            tables[key] = rows
            continue
        i += 1
    return tables


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return unique


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def number(cell: str) -> float:
    """The first number in a cell: `1,315` -> 1315, `1.72 (1.56-1.81)` -> 1.72."""
    match = re.search(r"-?[\d,]*\.?\d+(?:e[-+]?\d+)?", cell)
    if match is None:
        raise ValueError(f"no number in table cell {cell!r}")
    return float(match.group().replace(",", ""))


def _find(tables: dict, fragment: str) -> list[dict[str, str]]:
    for heading, rows in tables.items():
        if fragment in heading:
            return rows
    raise KeyError(f"no table under a heading containing {fragment!r}")


def microbatch_memory() -> list[tuple[str, list[float], list[float]]]:
    """(label, microbatch sizes, temp MiB) for `bench_microbatch.py`'s workloads."""
    tables = read_tables(RESULTS / "microbatch.md")
    series = []
    for workload in ("grad_accumulation", "per_example_grad"):
        rows = _find(tables, f"`{workload}`")
        sizes = [number(row["mb"]) for row in rows]
        for library in ("eqx_micro", "optax"):
            values = [number(row[f"{library} temp MiB"]) for row in rows]
            series.append((f"{workload}: {library}", sizes, values))
    return series


def clipped_memory() -> list[tuple[str, list[float], list[float]]]:
    """(label, microbatch sizes, temp MiB): clipped MLP sum, B=256 (`bench_grad.py`)."""
    rows = _find(read_tables(RESULTS / "grad.md"), "MLP B=256: clipped")
    series = []
    for variant in ("eqx_micro micro_grad", "optax micro_grad", "jax_privacy clipped_grad"):
        points = [
            (number(row["mb"]), row)
            for row in rows
            if row["variant"] == variant and row["mb"] != "-"
        ]
        series.append(
            (
                f"clipped grad sum, MLP B=256: {variant.split()[0]}",
                [mb for mb, _ in points],
                [number(row["XLA temp MiB"]) for _, row in points],
            )
        )
    return series


def plot_memory(path: pathlib.Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"grad_accumulation": "C0", "per_example_grad": "C1", "clipped": "C2"}
    styles = {"eqx_micro": ("-", "o"), "optax": ("--", "s"), "jax_privacy": (":", "^")}
    for label, sizes, values in microbatch_memory() + clipped_memory():
        workload, library = label.split(": ")
        line, marker = styles[library]
        color = colors[workload.split()[0].split(",")[0]]
        ax.plot(sizes, values, line, marker=marker, color=color, label=label)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="microbatch size (examples)",
        ylabel="XLA temp memory (MiB)",
        title="Memory vs microbatch size (batch 1024; clipped sum: batch 256)",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# What each line of the time plot runs (`bench_microbatch.py`); 1.0 is the plain
# function on the whole batch at once: `jax.grad(loss)`, or `jax.vmap(grad)`.
TRANSFORMS = {
    "grad_accumulation": {
        "eqx_micro": "em.microbatch(jax.grad(loss), Mean())",
        "optax": "optax microbatch(jax.grad(loss), MEAN)",
    },
    "per_example_grad": {
        "eqx_micro": "em.micro_vmap(grad)",
        "optax": "optax micro_vmap(grad)",
    },
}
WORKLOAD_NAMES = {
    "grad_accumulation": "accumulated gradient, MLP 784-512-512-10",
    "per_example_grad": "per-example input gradients, MLP 784-2048-2048-10",
}


def plot_time(path: pathlib.Path) -> None:
    tables = read_tables(RESULTS / "microbatch.md")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for workload in ("grad_accumulation", "per_example_grad"):
        rows = _find(tables, f"`{workload}`")
        sizes = [number(row["mb"]) for row in rows]
        color = "C0" if workload == "grad_accumulation" else "C1"
        # The paired ratios the tables and the docs quote (each call against the plain
        # call of the same round), not a ratio of two medians.
        columns = {"eqx_micro": "× plain, paired", "optax": "× plain, paired (2)"}
        for library, style in (("eqx_micro", "-"), ("optax", "--")):
            ratios = [number(row[columns[library]]) for row in rows]
            transform = TRANSFORMS[workload][library]
            label = f"{WORKLOAD_NAMES[workload]}: {transform}"
            ax.plot(sizes, ratios, style, marker="o", color=color, label=label)
    ax.axhline(
        1.0, color="grey", lw=0.8, label="1.0: jax.grad / jax.vmap(grad), whole batch"
    )
    ax.set(
        xscale="log",
        xlabel="microbatch size (examples)",
        ylabel="time / plain function (paired, same run)",
        title="Time vs microbatch size (batch 1024)",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def accuracy_rows(path: pathlib.Path) -> list[tuple[str, float, float, float]]:
    """(training, epsilon or inf, mean accuracy %, std) from an example's results table."""
    rows = []
    for table in read_tables(path).values():
        for row in table:
            training = row.get("training")
            accuracy = row.get("test accuracy (mean ± std)")
            if training is None or accuracy is None:
                continue
            epsilon_cell = next(v for k, v in row.items() if k.startswith("epsilon"))
            epsilon = float("inf") if "∞" in epsilon_cell else number(epsilon_cell)
            mean, std = (number(part) for part in accuracy.split("±"))
            rows.append((training, epsilon, mean, std))
    return rows


def plot_privacy_utility(path: pathlib.Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4.2))
    sources = [EXAMPLE_RESULTS / "dp_digits.md", EXAMPLE_RESULTS / "bandmf_vs_dpsgd.md"]
    epsilons: set[float] = set()
    for source in sources:
        if not source.exists():
            continue
        rows = accuracy_rows(source)
        curves: dict[str, list[tuple[float, float, float]]] = {}
        for training, epsilon, mean, std in rows:
            if epsilon == float("inf"):
                ax.axhline(mean, color="grey", ls=":", label=f"{training} ({mean:.1f}%)")
                continue
            epsilons.add(epsilon)
            method = "BandMF" if "bandmf" in training.lower() else "DP-SGD"
            curves.setdefault(f"{method} ({source.stem})", []).append((epsilon, mean, std))
        for label, points in curves.items():
            points.sort()
            ax.errorbar(
                [p[0] for p in points],
                [p[1] for p in points],
                yerr=[p[2] for p in points],
                marker="o",
                capsize=3,
                label=label,
            )
    ax.set(
        xscale="log",
        xticks=sorted(epsilons),
        xticklabels=[f"{e:g}" for e in sorted(epsilons)],
        xlabel="epsilon (delta = 1e-5)",
        ylabel="test accuracy (%)",
        title="Privacy-utility on digits (mean ± std over seeds)",
    )
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=pathlib.Path, default=IMAGES)
    args = parser.parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for name, draw in (
        ("memory_vs_microbatch.png", plot_memory),
        ("time_vs_microbatch.png", plot_time),
        ("privacy_utility.png", plot_privacy_utility),
    ):
        draw(args.output_dir / name)
        print(f"wrote {args.output_dir / name}")


if __name__ == "__main__":
    main()
