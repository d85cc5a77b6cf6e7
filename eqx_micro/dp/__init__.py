"""Differential privacy on top of eqx_micro's microbatching: `import eqx_micro.dp as dp`."""

from ._accounting import (
    Accountant as Accountant,
    amplified_bandmf_event as amplified_bandmf_event,
    calibrate_noise_multiplier as calibrate_noise_multiplier,
    compute_epsilon as compute_epsilon,
    dpsgd_event as dpsgd_event,
    fixed_batch_dpsgd_event as fixed_batch_dpsgd_event,
    NeighboringRelation as NeighboringRelation,
    truncated_amplified_bandmf_event as truncated_amplified_bandmf_event,
    truncated_dpsgd_event as truncated_dpsgd_event,
)
from ._auditing import (
    AbstractThresholdStrategy as AbstractThresholdStrategy,
    Bonferroni as Bonferroni,
    BootstrapParams as BootstrapParams,
    CanaryScoreAuditor as CanaryScoreAuditor,
    Explicit as Explicit,
    MultiSplit as MultiSplit,
    Split as Split,
    ThresholdStrategy as ThresholdStrategy,
)
from ._canaries import (
    audit as audit,
    AuditMethod as AuditMethod,
    AuditReport as AuditReport,
    CanaryLoss as CanaryLoss,
    GradientCanaries as GradientCanaries,
    InputCanaries as InputCanaries,
)
from ._clipping._adaptive import (
    AdaptiveClipState as AdaptiveClipState,
    QuantileAdaptiveClipping as QuantileAdaptiveClipping,
)
from ._clipping._callable import (
    BoundedSensitivityCallable as BoundedSensitivityCallable,
    clipped_fun as clipped_fun,
    clipped_grad as clipped_grad,
    ghost_clipped_grad as ghost_clipped_grad,
    GhostClippedGrad as GhostClippedGrad,
)
from ._clipping._clipping_fn import (
    AbadiClipping as AbadiClipping,
    AbstractClippingFn as AbstractClippingFn,
    AutomaticClipping as AutomaticClipping,
)
from ._clipping._contract import (
    AbstractBoundedSensitivityCallable as AbstractBoundedSensitivityCallable,
    ClippedGradAux as ClippedGradAux,
    PrivacyUnit as PrivacyUnit,
)
from ._clipping._pytree import clip_pytree as clip_pytree, ClipL2 as ClipL2
from ._ghost._strategy import GhostFallback as GhostFallback, GhostMethod as GhostMethod
from ._noise._banded_toeplitz import (
    banded_toeplitz_loss as banded_toeplitz_loss,
    optimize_banded_toeplitz as optimize_banded_toeplitz,
    per_query_error as per_query_error,
    sqrt_toeplitz_coefs as sqrt_toeplitz_coefs,
    strategy_rmse as strategy_rmse,
)
from ._noise._bandmf import BandMFNoise as BandMFNoise, BandMFNoiseState as BandMFNoiseState
from ._noise._base import (
    AbstractNoiseState as AbstractNoiseState,
    AbstractNoiseTransform as AbstractNoiseTransform,
)
from ._noise._blt import BLTNoise as BLTNoise, BLTNoiseState as BLTNoiseState
from ._noise._buffered_toeplitz import (
    BufferedToeplitz as BufferedToeplitz,
    ErrorObjective as ErrorObjective,
    optimize_blt as optimize_blt,
)
from ._noise._gaussian import (
    GaussianNoise as GaussianNoise,
    GaussianNoiseState as GaussianNoiseState,
)
from ._plan._bandmf import (
    BandMFExecutionPlanConfig as BandMFExecutionPlanConfig,
    choose_num_bands as choose_num_bands,
)
from ._plan._blt import BLTExecutionPlanConfig as BLTExecutionPlanConfig
from ._plan._dpsgd import DPSGDExecutionPlanConfig as DPSGDExecutionPlanConfig
from ._plan._plan import DPExecutionPlan as DPExecutionPlan, NoisyRelease as NoisyRelease
from ._sampling._base import (
    AbstractBatchSelectionStrategy as AbstractBatchSelectionStrategy,
)
from ._sampling._fixed import (
    BallsInBinsSampling as BallsInBinsSampling,
    FixedBatchSampling as FixedBatchSampling,
)
from ._sampling._padding import (
    gather_padded_batch as gather_padded_batch,
    pad_to_multiple_of as pad_to_multiple_of,
    split_and_pad_global_batch as split_and_pad_global_batch,
)
from ._sampling._poisson import (
    CyclicPoissonSampling as CyclicPoissonSampling,
    PartitionType as PartitionType,
    PoissonSampling as PoissonSampling,
)
from ._sampling._users import (
    UserLevelSampling as UserLevelSampling,
    UserSelectionStrategy as UserSelectionStrategy,
)
from ._trainer._state import PrivacyReport as PrivacyReport, TrainState as TrainState
from ._trainer._trainer import DPTrainer as DPTrainer
