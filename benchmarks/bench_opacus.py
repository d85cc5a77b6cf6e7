"""Benchmarks Opacus (PyTorch, CPU) on the models of `bench_grad.py`, for side-by-side
tables with our ghost clipping.

Runs OUTSIDE the main environment: torch is large and never part of the `test` or
`bench` extras. Create its own venv once (the `opacus` extra of `pyproject.toml`):

    python -m venv /tmp/opacus-venv
    /tmp/opacus-venv/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu
    /tmp/opacus-venv/bin/pip install opacus numpy

and run `/tmp/opacus-venv/bin/python benchmarks/bench_opacus.py` from the repository
root (5-10 minutes on 2 cores), or `--quick` (2 rounds at batch 32, a smoke test);
`--models mlp cnn`, `--batches 256 1024`. Results go to
`benchmarks/results/opacus.md` (`opacus-quick.md` with `--quick`).

Models and data match `bench_grad.py` (`make_model`, `make_batch`): an MLP
784-512-512-10 with ReLU (669,706 parameters) and the DP-SGD MNIST CNN (26,010
parameters), random normal inputs, integer labels in [0, 10), batch-mean cross-entropy.

Variants of each (model, batch) table, all one full training step with SGD(lr=0.1):

- `torch_plain`: zero_grad, forward, mean loss, backward, step (non-private);
- `opacus_ghost_clip`: `PrivacyEngine.make_private(grad_sample_mode="ghost")`, whose
  criterion wrapper runs two backward passes: per-example norms (ghost norms for
  `nn.Linear`; Opacus 1.6 has no norm sampler for `nn.Conv2d`, so the CNN's convolutions
  materialize their per-example gradients), then the reweighted loss;
- `opacus_hooks`: the classic `GradSampleModule` (`grad_sample_mode="hooks"`):
  per-example gradients of every layer, clipped by `DPOptimizer`.

Both DP variants clip to norm 1 and add noise with multiplier 1; Poisson sampling is off
(one fixed batch). Every variant is timed round-robin in one process, the order rotating
every round, after 3 warm-up steps; one measurement repeats the step enough times to
last about 0.25 s. Ratios are paired: each variant's time over `torch_plain`'s in the
same round, median and interquartile range over rounds. Peak RSS growth is measured in
a fresh subprocess per variant (`VmHWM` after 3 steps minus `VmRSS` before them).

Before timing, the script checks `opacus_ghost_clip`'s summed clipped gradient (noise 0)
against per-example clipping written with `torch.func.vmap(grad)`, and fails if they
differ by more than 1e-5 (relative).
"""

import argparse
import copy
import dataclasses
import math
import os
import pathlib
import re
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable

import numpy as np
import opacus
import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


RESULTS = pathlib.Path(__file__).parent / "results"
THREADS = 2
CLIP_NORM = 1.0
NOISE_MULTIPLIER = 1.0
LEARNING_RATE = 0.1
WARMUP_STEPS = 3
MAX_ROUNDS = 20
MIN_ROUNDS = 5
TABLE_BUDGET_S = 60.0
# One measurement repeats the step until it lasts about this long: single steps of the
# small configurations (a few ms) are too close to timer and scheduler noise.
MEASUREMENT_S = 0.25
CHECK_BATCH = 8
CHECK_TOLERANCE = 1e-5
PARAM_COUNTS = {"mlp": 669_706, "cnn": 26_010}
VARIANTS = ("torch_plain", "opacus_ghost_clip", "opacus_hooks")
MIB = 2**20

# Opacus warns about its non-cryptographic RNG and the missing Poisson sampling on every
# `make_private`, torch that the input needs no gradient under Opacus' backward hooks:
# all as intended here.
warnings.filterwarnings("ignore", module="opacus")
warnings.filterwarnings("ignore", message="Full backward hook is firing")


# --------------------------------------------------------------------------------------
# Models and data (as in bench_grad.py).


def make_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "mlp":
        model = nn.Sequential(
            nn.Linear(784, 512), nn.ReLU(),
            nn.Linear(512, 512), nn.ReLU(),
            nn.Linear(512, 10),
        )  # fmt: skip
    else:
        model = nn.Sequential(
            nn.Conv2d(1, 16, 8, stride=2, padding=3), nn.Tanh(),
            nn.MaxPool2d(2, stride=1),
            nn.Conv2d(16, 32, 4, stride=2), nn.Tanh(),
            nn.MaxPool2d(2, stride=1),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 32), nn.Tanh(),
            nn.Linear(32, 10),
        )  # fmt: skip
    count = sum(p.numel() for p in model.parameters())
    assert count == PARAM_COUNTS[name], (name, count)
    return model


def make_batch(name: str, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    shape = (batch, 784) if name == "mlp" else (batch, 1, 28, 28)
    x = torch.randn(shape, generator=generator)
    y = torch.randint(0, 10, (batch,), generator=generator)
    return x, y


# --------------------------------------------------------------------------------------
# Training steps.


def plain_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable:
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)

    def step() -> None:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


def make_private(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    mode: str,
    noise_multiplier: float = NOISE_MULTIPLIER,
    clip_norm: float = CLIP_NORM,
) -> tuple:
    """Opacus' own entry point; the one-batch loader sets `expected_batch_size = B`."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    loader = DataLoader(TensorDataset(x, y), batch_size=len(x))
    return PrivacyEngine().make_private(
        module=model,
        optimizer=optimizer,
        criterion=nn.CrossEntropyLoss(),
        data_loader=loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=clip_norm,
        poisson_sampling=False,
        grad_sample_mode=mode,
    )


def ghost_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable:
    private_model, optimizer, criterion, _ = make_private(model, x, y, "ghost")

    def step() -> None:
        optimizer.zero_grad()
        criterion(private_model(x), y).backward()  # both backward passes
        optimizer.step()

    return step


def hooks_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable:
    private_model, optimizer, _ = make_private(model, x, y, "hooks")

    def step() -> None:
        optimizer.zero_grad()
        F.cross_entropy(private_model(x), y).backward()
        optimizer.step()

    return step


STEP_BUILDERS = {
    "torch_plain": plain_step,
    "opacus_ghost_clip": ghost_step,
    "opacus_hooks": hooks_step,
}


def build_step(variant: str, model_name: str, batch: int) -> Callable:
    x, y = make_batch(model_name, batch)
    return STEP_BUILDERS[variant](make_model(model_name), x, y)


# --------------------------------------------------------------------------------------
# Correctness: Opacus ghost clipping against per-example clipping with torch.func.


def reference_clipped_sum(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip_norm: float
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Sum over the batch of per-example gradients clipped to `clip_norm`, and the
    per-example norms."""
    params = {k: p.detach() for k, p in model.named_parameters()}

    def example_loss(params, xi, yi):
        logits = torch.func.functional_call(model, params, (xi[None],))
        return F.cross_entropy(logits, yi[None])

    grads = torch.func.vmap(torch.func.grad(example_loss), (None, 0, 0))(params, x, y)
    flat = torch.cat([g.reshape(len(x), -1) for g in grads.values()], dim=1)
    norms = flat.norm(dim=1)
    scale = torch.clamp(clip_norm / norms, max=1.0)
    summed = [torch.tensordot(scale, g, dims=1) for g in grads.values()]
    return summed, norms


def ghost_clipped_sum(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip_norm: float
) -> list[torch.Tensor]:
    """Opacus' clipped sum before noise and the division by the batch size."""
    private_model, optimizer, criterion, _ = make_private(
        model, x, y, "ghost", noise_multiplier=0.0, clip_norm=clip_norm
    )
    optimizer.zero_grad()
    criterion(private_model(x), y).backward()
    optimizer.pre_step()  # sets `summed_grad`, noise 0
    return [p.summed_grad.detach().clone() for p in optimizer.params]


def relative_error(out: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """Relative L2 error over all parameters (as `bench_grad.relative_error`)."""
    a = torch.cat([t.reshape(-1) for t in out]).double()
    b = torch.cat([t.reshape(-1) for t in reference]).double()
    return float((a - b).norm() / b.norm())


def check_ghost_clipping(model_name: str) -> str:
    """Asserts the ghost clipped sum against torch.func; clips at the median norm so
    that half the examples are clipped and half are not."""
    x, y = make_batch(model_name, CHECK_BATCH)
    model = make_model(model_name)
    _, norms = reference_clipped_sum(model, x, y, CLIP_NORM)
    clip_norm = float(norms.median())
    reference, _ = reference_clipped_sum(model, x, y, clip_norm)
    ours = ghost_clipped_sum(copy.deepcopy(model), x, y, clip_norm)
    error = relative_error(ours, reference)
    assert error < CHECK_TOLERANCE, (model_name, error)
    clipped = int((norms > clip_norm).sum())
    return (
        f"{model_name.upper()}: relative L2 error {error:.1e} "
        f"(batch {CHECK_BATCH}, clip norm {clip_norm:.3g} = median norm, "
        f"{clipped} of {CHECK_BATCH} clipped)"
    )


# --------------------------------------------------------------------------------------
# Peak memory, one fresh subprocess per variant.


def proc_status_kib(field: str) -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def rss_probe(variant: str, model_name: str, batch: int) -> float:
    """MiB of peak RSS above the resident set before the steps."""
    torch.set_num_threads(THREADS)
    step = build_step(variant, model_name, batch)
    # Resets VmHWM to the current RSS, so import-time peaks do not hide the step's.
    pathlib.Path("/proc/self/clear_refs").write_text("5")
    before = proc_status_kib("VmRSS")
    for _ in range(WARMUP_STEPS):
        step()
    return (proc_status_kib("VmHWM") - before) / 1024


def measure_rss(variant: str, model_name: str, batch: int) -> float:
    command = [sys.executable, __file__, "--rss-probe", variant, model_name, str(batch)]
    try:
        out = subprocess.run(command, capture_output=True, text=True, check=True)
        return float(out.stdout.strip().splitlines()[-1])
    except (subprocess.CalledProcessError, ValueError, IndexError) as error:
        print(f"RSS probe failed for {variant}: {error}", file=sys.stderr)
        return float("nan")


# --------------------------------------------------------------------------------------
# Paired timing.


@dataclasses.dataclass
class Variant:
    name: str
    step: Callable
    reps: int = 1
    times: list = dataclasses.field(default_factory=list)  # seconds per step
    rss_mib: float = float("nan")

    def warm_up_and_calibrate(self) -> None:
        for _ in range(WARMUP_STEPS):
            self.step()
        t0 = time.perf_counter()
        self.step()
        self.reps = max(1, math.ceil(MEASUREMENT_S / (time.perf_counter() - t0)))

    def measure(self) -> None:
        t0 = time.perf_counter()
        for _ in range(self.reps):
            self.step()
        self.times.append((time.perf_counter() - t0) / self.reps)


def time_paired(variants: list[Variant], max_rounds: int, budget_s: float) -> int:
    """Measures every variant once per round, rotating the order; returns the rounds."""
    rounds = 0
    start = time.perf_counter()
    while rounds < max_rounds:
        offset = rounds % len(variants)
        for variant in variants[offset:] + variants[:offset]:
            variant.measure()
        rounds += 1
        elapsed = time.perf_counter() - start
        next_round_ends = elapsed / rounds * (rounds + 1)
        if rounds >= min(MIN_ROUNDS, max_rounds) and next_round_ends > budget_s:
            break
    return rounds


def paired(a: Variant, b: Variant) -> tuple[float, float, float]:
    """Median and quartiles over rounds of `a`'s time over `b`'s in the same round."""
    ratios = [ta / tb for ta, tb in zip(a.times, b.times, strict=True)]
    if len(ratios) == 1:
        return ratios[0], ratios[0], ratios[0]
    q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return median, q1, q3


def load_average() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_ticks() -> tuple[int, int]:
    """(steal, total) jiffies over all CPUs. Steal is time the hypervisor gave to other
    guests: no load average shows it, and it slows the steps like a busy neighbor."""
    fields = [int(v) for v in pathlib.Path("/proc/stat").read_text().split()[1:9]]
    return fields[7], sum(fields)


def steal_percent(before: tuple[int, int], after: tuple[int, int]) -> float:
    total = after[1] - before[1]
    return 100 * (after[0] - before[0]) / total if total else float("nan")


def other_benchmarks() -> list[str]:
    """Command lines of other `bench_*.py` processes (they share the 2 cores); the
    parent is skipped as it may be a wrapper such as `time`."""
    found = []
    for cmdline in pathlib.Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:  # the process ended meanwhile
            continue
        is_bench = any(re.search(r"bench_\w+\.py$", a) for a in args)
        if is_bench and int(cmdline.parent.name) not in (os.getpid(), os.getppid()):
            found.append(" ".join(a for a in args if a))
    return found


# --------------------------------------------------------------------------------------
# Tables.


def run_table(model_name: str, batch: int, max_rounds: int) -> str:
    variants = [Variant(name, build_step(name, model_name, batch)) for name in VARIANTS]
    for variant in variants:
        variant.rss_mib = measure_rss(variant.name, model_name, batch)
    for variant in variants:
        variant.warm_up_and_calibrate()
    load_before, ticks_before = load_average(), cpu_ticks()
    others = set(other_benchmarks())
    rounds = time_paired(variants, max_rounds, TABLE_BUDGET_S)
    load_after, ticks_after = load_average(), cpu_ticks()
    others |= set(other_benchmarks())
    plain = variants[0]
    lines = [
        f"### {model_name.upper()} B={batch}",
        "",
        f"{rounds} rounds; steps per measurement "
        + ", ".join(f"{v.name} {v.reps}" for v in variants)
        + f"; load average (1/5/15 min) {load_before} before timing, "
        f"{load_after} after; CPU steal "
        f"{steal_percent(ticks_before, ticks_after):.0f}% during timing; other "
        "benchmarks running before or after timing: "
        + ("; ".join(f"`{c}`" for c in sorted(others)) or "none")
        + ".",
        "",
        "| variant | median ms | x torch_plain (IQR) | peak RSS growth MiB |",
        "|---|---:|---:|---:|",
    ]
    for variant in variants:
        median, q1, q3 = paired(variant, plain)
        ms = statistics.median(variant.times) * 1e3
        lines.append(
            f"| {variant.name} | {ms:,.1f} | {median:.2f} ({q1:.2f}-{q3:.2f}) "
            f"| {variant.rss_mib:,.1f} |"
        )
    return "\n".join(lines) + "\n"


def header(command: str, load_start: str) -> str:
    return (
        f"torch {torch.__version__}, opacus {opacus.__version__}, numpy "
        f"{np.__version__}; torch.set_num_threads({THREADS}) on {os.cpu_count()} CPU "
        f"cores; `{command}`; load average (1/5/15 min) at start {load_start}."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds at batch 32")
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"])
    parser.add_argument("--batches", nargs="+", type=int)
    parser.add_argument("--rss-probe", nargs=3, metavar=("VARIANT", "MODEL", "BATCH"))
    args = parser.parse_args()
    if args.rss_probe:
        variant, model_name, batch = args.rss_probe
        print(f"{rss_probe(variant, model_name, int(batch)):.1f}")
        return

    start = time.perf_counter()
    torch.set_num_threads(THREADS)
    command = " ".join([sys.executable, *sys.argv])
    load_start = load_average()
    batches = args.batches or ([32] if args.quick else [256, 1024])
    max_rounds = 2 if args.quick else MAX_ROUNDS

    checks = [check_ghost_clipping(name) for name in args.models]
    for line in checks:
        print("check", line, flush=True)
    sections = []
    for model_name in args.models:
        for batch in batches:
            sections.append(run_table(model_name, batch, max_rounds))
            print(sections[-1], flush=True)

    text = "\n".join(
        [
            header(command, load_start),
            "",
            "Ghost-clipping check (noise 0, clipped sum against torch.func "
            "vmap(grad) + clip): " + "; ".join(checks) + ".",
            "",
            *sections,
            f"Load average (1/5/15 min) at the end {load_average()}; total runtime "
            f"{time.perf_counter() - start:.0f} s.",
        ]
    )
    out = RESULTS / ("opacus-quick.md" if args.quick else "opacus.md")
    out.write_text(text + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
