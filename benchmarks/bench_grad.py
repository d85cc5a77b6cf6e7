"""Benchmarks per-example clipped gradients and gradient accumulation.

Models: an MLP 784-512-512-10 (669,706 parameters) and the DP-SGD MNIST CNN (two
convolutions, two linear layers; 26,010 parameters), both `eqx.nn` models, on synthetic
data at batch 256 and 1024. All ratios are to the plain non-private
`eqx.filter_value_and_grad` of the mean loss, measured in the same process with every
variant of a table interleaved round-robin.

Sections:

- `clip`: the sum over the batch of per-example gradients clipped to L2 norm 1:
  `em.micro_grad(..., transform_fn=clip)` at several microbatch sizes, against a
  hand-written `vmap(grad)` + clip + `tensordot`, `optax.microbatching.micro_grad`
  and `jax_privacy.clipping.clipped_grad` (the `bench` extra) at the same sizes.
- `accumulate`: `em.accumulate_gradients` (loop, unrolled) against the full
  batch and `optax.microbatching.microbatch`; `microbatch(filter_grad(f))` against
  `filter_grad(microbatch(f))`.
- `compile`: compile time of the loop and the unrolled accumulation at 2 to 128
  microbatches.
- `layout`: the CNN at batch 1024 accumulated over 2 to 128 microbatches in the loop
  (convolutions replayed channels-last, the default), in the loop with the convolutions
  as written (how the engine ran before; XLA:CPU keeps them NCHW inside a loop), and
  unrolled: time, XLA temp memory and compile time.
- `memory`: XLA temp memory only (compiled, not run) of the clipped sum, ours against
  optax and jax_privacy, for both models at batch 256 and 1024 and every microbatch size,
  including the unmicrobatched MLP steps too slow to time.

Run `python benchmarks/bench_grad.py` (about 15 minutes) or `--quick` (a smoke test);
`--section clip` runs one section. Results go to `benchmarks/results/grad.md`
(`grad-SECTION.md` for one section).
"""

import argparse
import contextlib
import dataclasses
import functools
import pathlib
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax.microbatching as omb

import eqx_micro as em
from eqx_micro import internal


RESULTS = pathlib.Path(__file__).parent / "results"
MIB = 2**20
# Variants whose step takes longer than this are timed once and marked.
SLOW_SECONDS = 20.0


# --------------------------------------------------------------------------------------
# Models and data.


class CNN(eqx.Module):
    """The DP-SGD MNIST CNN (Papernot et al. 2020; Opacus and TF-Privacy tutorials)."""

    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    fc1: eqx.nn.Linear
    fc2: eqx.nn.Linear

    def __init__(self, key):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.conv1 = eqx.nn.Conv2d(1, 16, 8, stride=2, padding=3, key=k1)
        self.conv2 = eqx.nn.Conv2d(16, 32, 4, stride=2, key=k2)
        self.fc1 = eqx.nn.Linear(32 * 4 * 4, 32, key=k3)
        self.fc2 = eqx.nn.Linear(32, 10, key=k4)

    def __call__(self, image):
        pool = eqx.nn.MaxPool2d(2, stride=1)
        h = pool(jnp.tanh(self.conv1(image)))
        h = pool(jnp.tanh(self.conv2(h)))
        return self.fc2(jnp.tanh(self.fc1(h.reshape(-1))))


def make_model(name: str, key: jax.Array) -> Any:
    if name == "mlp":
        return eqx.nn.MLP(784, 10, 512, 2, activation=jax.nn.relu, key=key)
    return CNN(key)


def make_batch(name: str, batch: int, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    kx, ky = jax.random.split(key)
    shape = (batch, 784) if name == "mlp" else (batch, 1, 28, 28)
    return jax.random.normal(kx, shape), jax.random.randint(ky, (batch,), 0, 10)


def example_loss(model, x, y):
    """Cross-entropy of one example (no batch axis)."""
    logits = model(x)
    return -jax.nn.log_softmax(logits)[y]


def mean_loss(model, x, y):
    return jnp.mean(jax.vmap(example_loss, (None, 0, 0))(model, x, y))


def batch_of_one_loss(params, static, x, y):
    """Loss on a batch axis of size 1 (the `keep_batch_dim=True` convention)."""
    return mean_loss(eqx.combine(params, static), x, y)


def clip(grads: Any) -> Any:
    leaves = [g for g in jax.tree.leaves(grads)]
    norm = jnp.sqrt(sum(jnp.sum(g.astype(jnp.float32) ** 2) for g in leaves))
    scale = jnp.minimum(1.0, 1.0 / norm)
    return jax.tree.map(lambda g: g * scale, grads)


# --------------------------------------------------------------------------------------
# Measurement.


def jit_arrays(fn: Callable, *args: Any) -> tuple[Callable, tuple]:
    """`jax.jit` over the array leaves of `args` (the rest closed over), so the compiled
    executable exposes `memory_analysis()`."""
    dynamic, static = eqx.partition(args, eqx.is_array)
    return jax.jit(lambda dyn: fn(*eqx.combine(dyn, static))), (dynamic,)


@dataclasses.dataclass
class Variant:
    name: str
    microbatch: str
    fun: Callable  # jitted, called with `args`
    args: tuple
    compiled: Any = None
    times: list = dataclasses.field(default_factory=list)
    temp_mib: float = float("nan")
    compile_s: float = float("nan")
    error: float = float("nan")
    note: str = ""
    context: Callable = contextlib.nullcontext  # active while tracing


def convs_as_written():
    """Traces without the backend's channels-last convolutions (for comparison only)."""
    return internal.disabled(internal.Tweak.CHANNELS_LAST_CONV)


def prepare(variant: Variant) -> Any:
    start = time.perf_counter()
    with variant.context():
        variant.compiled = variant.fun.lower(*variant.args).compile()
    variant.compile_s = time.perf_counter() - start
    analysis = variant.compiled.memory_analysis()
    if analysis is not None:
        variant.temp_mib = analysis.temp_size_in_bytes / MIB
    out = jax.block_until_ready(variant.compiled(*variant.args))
    return out


def relative_error(out: Any, reference: Any) -> float:
    """Relative L2 error; NaN where the outputs are not comparable (the plain step)."""
    a = jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(out)])
    b = jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(reference)])
    if a.shape != b.shape:
        return float("nan")
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def time_round_robin(variants: list[Variant], repeats: int) -> None:
    for _ in range(repeats):
        for v in variants:
            if v.times and (
                v.times[0] > SLOW_SECONDS
                or len(v.times) >= max(2, int(10 / max(v.times[0], 1e-3)))
            ):
                continue  # Slow variants: fewer samples.
            start = time.perf_counter()
            jax.block_until_ready(v.compiled(*v.args))
            v.times.append(time.perf_counter() - start)


def table(title: str, variants: list[Variant], base: Variant) -> str:
    base_t = statistics.median(base.times)
    rows = [
        f"### {title}",
        "",
        "| variant | mb | median ms | x plain | n | XLA temp MiB | compile s | rel. err |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v in variants:
        if not v.times:
            rows.append(f"| {v.name} | {v.microbatch} | {v.note} | | | | | |")
            continue
        t = statistics.median(v.times)
        rows.append(
            f"| {v.name} | {v.microbatch} | {t * 1e3:,.1f} | {t / base_t:,.2f} | "
            f"{len(v.times)} | {v.temp_mib:,.1f} | {v.compile_s:.2f} | "
            f"{'-' if np.isnan(v.error) else f'{v.error:.0e}'} |"
        )
    return "\n".join(rows) + "\n"


def run_table(title, variants, base, reference_index, repeats) -> str:
    outs = [prepare(v) for v in variants]
    reference = outs[reference_index]
    for v, out in zip(variants, outs):
        v.error = relative_error(out, reference)
    time_round_robin(variants, repeats)
    text = table(title, variants, base)
    print(text, flush=True)
    return text


# --------------------------------------------------------------------------------------
# Sections.


def clip_section(model_name: str, batch: int, sizes, repeats, with_references) -> str:
    model = make_model(model_name, jax.random.key(0))
    x, y = make_batch(model_name, batch, jax.random.key(1))
    params, static = eqx.partition(model, eqx.is_inexact_array)

    plain = Variant(
        "plain value_and_grad",
        "-",
        *jit_arrays(eqx.filter_value_and_grad(mean_loss), model, x, y),
    )

    def vmap_clip_sum(model, x, y):
        per_example = jax.vmap(eqx.filter_grad(example_loss), (None, 0, 0))(model, x, y)
        leaves = jax.tree.leaves(per_example)
        norms = jnp.sqrt(sum(jnp.sum(g.reshape(g.shape[0], -1) ** 2, 1) for g in leaves))
        scale = jnp.minimum(1.0, 1.0 / norms)
        return jax.tree.map(lambda g: jnp.tensordot(scale, g, 1), per_example)

    reference = Variant(
        "vmap(grad) + clip + tensordot", "-", *jit_arrays(vmap_clip_sum, model, x, y)
    )
    variants = [plain, reference]
    for mb in sizes:
        label = "-" if mb is None else str(mb)
        ours = em.micro_grad(
            batch_of_one_loss,
            argnums=0,
            batch_argnums=(2, 3),
            microbatch_size=mb,
            transform_fn=clip,
        )
        variants.append(
            Variant(
                "eqx_micro micro_grad",
                label,
                *jit_arrays(
                    lambda p, s, x, y, f=ours: f(p, s, x, y)[0], params, static, x, y
                ),
            )
        )
        if not with_references:
            continue
        theirs = omb.micro_grad(
            functools.partial(_optax_loss, static=static),
            batch_argnums=1,
            microbatch_size=mb,
            transform_fn=clip,
        )
        variants.append(
            Variant(
                "optax micro_grad",
                label,
                jax.jit(lambda p, x, y, f=theirs: f(p, (x, y))[0]),
                (params, x, y),
            )
        )
        jp = _jax_privacy_clipped_grad(static, mb)
        if jp is not None:
            variants.append(
                Variant("jax_privacy clipped_grad", label, jax.jit(jp), (params, x, y))
            )
    # The per-example references are per-example sums; the plain step is a mean.
    plain_index = 1
    title = f"{model_name.upper()} B={batch}: clipped per-example gradient sum"
    return run_table(title, variants, plain, plain_index, repeats)


def _optax_loss(params, batch, static):
    x, y = batch
    return batch_of_one_loss(params, static, x, y)


def _jax_privacy_clipped_grad(static, microbatch_size):
    try:
        from jax_privacy import clipping
    except ImportError:  # The `bench` extra is not installed.
        return None
    fun = clipping.clipped_grad(
        lambda p, x, y: batch_of_one_loss(p, static, x, y),
        l2_clip_norm=1.0,
        batch_argnums=(1, 2),
        microbatch_size=microbatch_size,
    )
    return fun


def memory_section(model_name: str, batch: int, sizes) -> str:
    """XLA temp memory of the clipped sum (compiled, not run): ours, optax, jax_privacy."""
    model = make_model(model_name, jax.random.key(0))
    x, y = make_batch(model_name, batch, jax.random.key(1))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    lines = [
        f"### {model_name.upper()} B={batch}: XLA temp MiB of the clipped gradient sum",
        "",
        "| mb | eqx_micro | optax | jax_privacy | eqx_micro - min(others) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for mb in sizes:
        ours = em.micro_grad(
            batch_of_one_loss, batch_argnums=(2, 3), microbatch_size=mb, transform_fn=clip
        )
        optax_fn = omb.micro_grad(
            functools.partial(_optax_loss, static=static),
            batch_argnums=1,
            microbatch_size=mb,
            transform_fn=clip,
        )
        candidates = {
            "ours": jax.jit(lambda p, x, y, f=ours: f(p, static, x, y)[0]),
            "optax": jax.jit(lambda p, x, y, f=optax_fn: f(p, (x, y))[0]),
        }
        jp = _jax_privacy_clipped_grad(static, mb)
        if jp is not None:
            candidates["jax_privacy"] = jax.jit(jp)
        temp = {}
        for name, fn in candidates.items():
            analysis = fn.lower(params, x, y).compile().memory_analysis()
            temp[name] = analysis.temp_size_in_bytes / MIB
        others = [v for k, v in temp.items() if k != "ours"]
        cells = [f"{temp.get(k, float('nan')):,.2f}" for k in candidates]
        lines.append(
            f"| {'-' if mb is None else mb} | {' | '.join(cells)} "
            f"| {temp['ours'] - min(others):+.2f} |"
        )
    return "\n".join(lines) + "\n"


def accumulate_section(model_name: str, batch: int, counts, repeats) -> str:
    model = make_model(model_name, jax.random.key(0))
    x, y = make_batch(model_name, batch, jax.random.key(1))
    data = {"x": x, "y": y}

    def loss_fn(model, data):
        return mean_loss(model, data["x"], data["y"])

    plain = Variant(
        "plain value_and_grad",
        "-",
        *jit_arrays(lambda m, d: eqx.filter_value_and_grad(loss_fn)(m, d)[1], model, data),
    )
    variants = [plain]
    for n in counts:
        mb = batch // n
        # `unroll=k`: k microbatches per loop iteration (they run concurrently).
        modes = [("loop", False)] + [(f"unroll={k}", k) for k in (2, 4) if k < n]
        for mode, unroll in [*modes, ("unrolled", True)]:
            f = functools.partial(
                em.accumulate_gradients, loss_fn, num_microbatches=n, unroll=unroll
            )
            variants.append(
                Variant(
                    f"eqx_micro accumulate ({mode})",
                    str(mb),
                    *jit_arrays(lambda m, d, f=f: f(m, d).grads, model, data),
                )
            )
        params, static = eqx.partition(model, eqx.is_inexact_array)
        grad = jax.grad(lambda p, x, y, s=static: mean_loss(eqx.combine(p, s), x, y))
        variants.append(
            Variant(
                "optax microbatch(grad)",
                str(mb),
                jax.jit(omb.microbatch(grad, (1, 2), mb, omb.AccumulationType.MEAN)),
                (params, x, y),
            )
        )
        inner = em.microbatch(eqx.filter_grad(mean_loss), (1, 2), mb, em.Mean())
        outer = eqx.filter_grad(
            lambda m, x, y, mb=mb: em.microbatch(mean_loss, (1, 2), mb, em.Mean())(m, x, y)
        )
        variants.append(
            Variant("microbatch(filter_grad(f))", str(mb), *jit_arrays(inner, model, x, y))
        )
        variants.append(
            Variant("filter_grad(microbatch(f))", str(mb), *jit_arrays(outer, model, x, y))
        )
    title = f"{model_name.upper()} B={batch}: gradient accumulation (mean loss)"
    return run_table(title, variants, plain, 0, repeats)


def compile_section(model_name: str, batch: int, counts) -> str:
    model = make_model(model_name, jax.random.key(0))
    x, y = make_batch(model_name, batch, jax.random.key(1))
    data = {"x": x, "y": y}

    def loss_fn(model, data):
        return mean_loss(model, data["x"], data["y"])

    rows = [
        f"### {model_name.upper()} B={batch}: compile time (s, min of 2) by microbatches",
        "",
        "| variant | " + " | ".join(f"{n} mb" for n in counts) + " |",
        "|---|" + "---:|" * len(counts),
    ]
    for mode, unroll in (("loop", False), ("loop, unroll=4", 4), ("unrolled", True)):
        cells = []
        for n in counts:
            best = float("inf")
            for _ in range(2):
                f, f_args = jit_arrays(  # A new function each time: no cache hit.
                    lambda m, d, n=n, unroll=unroll: (
                        em.accumulate_gradients(
                            loss_fn, m, d, num_microbatches=n, unroll=unroll
                        ).grads
                    ),
                    model,
                    data,
                )
                start = time.perf_counter()
                f.lower(*f_args).compile()
                best = min(best, time.perf_counter() - start)
            cells.append(f"{best:.2f}")
        rows.append(f"| accumulate ({mode}) | " + " | ".join(cells) + " |")
    text = "\n".join(rows) + "\n"
    print(text, flush=True)
    return text


def layout_section(batch: int, counts, repeats) -> str:
    model = make_model("cnn", jax.random.key(0))
    x, y = make_batch("cnn", batch, jax.random.key(1))
    data = {"x": x, "y": y}

    def loss_fn(model, data):
        return mean_loss(model, data["x"], data["y"])

    plain = Variant(
        "plain value_and_grad",
        "-",
        *jit_arrays(lambda m, d: eqx.filter_value_and_grad(loss_fn)(m, d)[1], model, data),
    )
    variants = [plain]
    modes = (
        ("loop", False, contextlib.nullcontext),
        ("loop, convs as written", False, convs_as_written),
        ("unrolled", True, contextlib.nullcontext),
    )
    for n in counts:
        for mode, unroll, context in modes:
            f = functools.partial(
                em.accumulate_gradients, loss_fn, num_microbatches=n, unroll=unroll
            )
            variant = Variant(
                f"accumulate ({mode})",
                f"{batch // n} (#{n})",
                *jit_arrays(lambda m, d, f=f: f(m, d).grads, model, data),
                context=context,
            )
            variants.append(variant)
    title = f"CNN B={batch}: accumulation by number of microbatches"
    return run_table(title, variants, plain, 0, repeats)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test")
    parser.add_argument(
        "--section", choices=["clip", "accumulate", "compile", "layout", "memory"]
    )
    parser.add_argument("--models", nargs="+", choices=["mlp", "cnn"])
    args = parser.parse_args(argv)
    sections = (
        [args.section] if args.section else ["clip", "accumulate", "compile", "layout"]
    )
    models = args.models or ["mlp", "cnn"]
    batches = (64,) if args.quick else (256, 1024)
    repeats = 2 if args.quick else 20
    header = (
        f"jax {jax.__version__}, {jax.device_count()} CPU device(s), "
        f"{len(jax.devices())} XLA devices; `python benchmarks/bench_grad.py"
        f"{''.join(' ' + a for a in (sys.argv[1:] if argv is None else argv))}`\n"
    )
    parts = [header]
    for name in models:
        for batch in batches:
            if "clip" in sections:
                sizes = (None, 16) if args.quick else (None, 32, 64, 256)
                sizes = tuple(s for s in sizes if s is None or s <= batch)
                # optax and jax_privacy: seconds to minutes per MLP step; B=256 only.
                refs = args.quick or name == "cnn" or batch == 256
                parts.append(clip_section(name, batch, sizes, repeats, refs))
            if "memory" in sections:
                sizes = (None, 16) if args.quick else (None, 32, 64, 256)
                sizes = tuple(s for s in sizes if s is None or s <= batch)
                parts.append(memory_section(name, batch, sizes))
            if "accumulate" in sections:
                counts = (4,) if args.quick else (4, 16)
                parts.append(accumulate_section(name, batch, counts, repeats))
        if "compile" in sections:
            counts = (2, 4) if args.quick else (2, 8, 32, 128)
            parts.append(compile_section(name, 64 if args.quick else 1024, counts))
    if "layout" in sections:
        counts = (2, 4) if args.quick else (2, 4, 8, 16, 32, 128)
        parts.append(layout_section(64 if args.quick else 1024, counts, repeats))
    RESULTS.mkdir(exist_ok=True)
    suffix = "-quick" if args.quick else ""
    section = f"-{args.section}" if args.section else ""
    only = "-" + "-".join(args.models) if args.models else ""
    (RESULTS / f"grad{section}{only}{suffix}.md").write_text("\n".join(parts))


if __name__ == "__main__":
    main()
