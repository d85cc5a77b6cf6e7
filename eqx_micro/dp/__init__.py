"""Differential privacy on top of eqx_micro's microbatching: `import eqx_micro.dp as dp`."""

from ._accounting import (
    amplified_bandmf_event as amplified_bandmf_event,
    calibrate_noise_multiplier as calibrate_noise_multiplier,
    compute_epsilon as compute_epsilon,
    dpsgd_event as dpsgd_event,
    fixed_batch_dpsgd_event as fixed_batch_dpsgd_event,
    NeighboringRelation as NeighboringRelation,
    truncated_amplified_bandmf_event as truncated_amplified_bandmf_event,
    truncated_dpsgd_event as truncated_dpsgd_event,
)
from ._bandmf_strategy import (
    banded_toeplitz_loss as banded_toeplitz_loss,
    optimize_banded_toeplitz as optimize_banded_toeplitz,
    per_query_error as per_query_error,
    sqrt_toeplitz_coefs as sqrt_toeplitz_coefs,
    strategy_rmse as strategy_rmse,
)
from ._clipped_grad import (
    AbstractBoundedSensitivityCallable as AbstractBoundedSensitivityCallable,
    BoundedSensitivityCallable as BoundedSensitivityCallable,
    clipped_grad as clipped_grad,
    ClippedGradAux as ClippedGradAux,
)
from ._clipping import clip_pytree as clip_pytree, ClipL2 as ClipL2
from ._ghost_clipped_grad import (
    ghost_clipped_grad as ghost_clipped_grad,
    GhostClippedGrad as GhostClippedGrad,
)
from ._noise import (
    AbstractNoiseTransform as AbstractNoiseTransform,
    BandMFNoise as BandMFNoise,
    BandMFNoiseState as BandMFNoiseState,
    GaussianNoise as GaussianNoise,
    GaussianNoiseState as GaussianNoiseState,
)
from ._plan import (
    BandMFExecutionPlanConfig as BandMFExecutionPlanConfig,
    choose_num_bands as choose_num_bands,
    DPExecutionPlan as DPExecutionPlan,
    DPSGDExecutionPlanConfig as DPSGDExecutionPlanConfig,
)
from ._sampling import (
    AbstractBatchSelectionStrategy as AbstractBatchSelectionStrategy,
    BallsInBinsSampling as BallsInBinsSampling,
    CyclicPoissonSampling as CyclicPoissonSampling,
    FixedBatchSampling as FixedBatchSampling,
    gather_padded_batch as gather_padded_batch,
    pad_to_multiple_of as pad_to_multiple_of,
    PartitionType as PartitionType,
    PoissonSampling as PoissonSampling,
    split_and_pad_global_batch as split_and_pad_global_batch,
    UserSelectionStrategy as UserSelectionStrategy,
)
from ._trainer import (
    DPTrainer as DPTrainer,
    PrivacyReport as PrivacyReport,
    TrainState as TrainState,
)
