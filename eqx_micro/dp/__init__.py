"""Differential privacy on top of eqx_micro's microbatching: `import eqx_micro.dp as dp`."""

from ._accounting import (
    calibrate_noise_multiplier as calibrate_noise_multiplier,
    compute_epsilon as compute_epsilon,
    dpsgd_event as dpsgd_event,
    fixed_batch_dpsgd_event as fixed_batch_dpsgd_event,
    NeighboringRelation as NeighboringRelation,
    truncated_dpsgd_event as truncated_dpsgd_event,
)
from ._clipping import clip_pytree as clip_pytree, ClipL2 as ClipL2
