"""eqx_micro: microbatching, per-example gradients and differential privacy for Equinox."""

import importlib.metadata as _metadata

from ._accumulate import (
    accumulate_gradients as accumulate_gradients,
    AccumulatedGradients as AccumulatedGradients,
)
from ._accumulators import (
    AbstractAccumulator as AbstractAccumulator,
    AccumulationType as AccumulationType,
    Concat as Concat,
    Max as Max,
    Mean as Mean,
    Min as Min,
    RunningMean as RunningMean,
    Sum as Sum,
)
from ._batch_axis import reshape_batch_axis as reshape_batch_axis
from ._early_stopping import (
    compute_early_stopping_order as compute_early_stopping_order,
    count_real_microbatches as count_real_microbatches,
    verify_early_stopping_order as verify_early_stopping_order,
)
from ._grad import micro_grad as micro_grad, PerExample as PerExample
from ._microbatch import micro_vmap as micro_vmap, microbatch as microbatch


__version__ = _metadata.version("eqx_micro")
