"""Aggregation factories: `create(value_spec) -> AggregationProcess`.

Every decomposable factory streams through the cohort loop (a per-client part, a sum, a server
part); the robust reductions that need every client at once work on stacked values.
"""

from fedjax_lite.aggregators._accounting import PrivacyAccountant
from fedjax_lite.aggregators._compression import QuantizationFactory, QuantizationState
from fedjax_lite.aggregators._differential_privacy import DifferentiallyPrivateFactory, DPState
from fedjax_lite.aggregators._dp_ftrl import (
  CorrelatedNoiseMechanism,
  DPFTRLFactory,
  DPFTRLState,
  build_dp_ftrl_mechanism,
  dp_ftrl_aggregator,
)
from fedjax_lite.aggregators._dp_ftrl_accounting import DPFTRLAccountant
from fedjax_lite.aggregators._factories import MeanFactory, SumFactory, UnweightedMeanFactory
from fedjax_lite.aggregators._presets import (
  compression_aggregator,
  default_clipping,
  default_zeroing,
  dp_aggregator,
  robust_aggregator,
  secure_aggregator,
)
from fedjax_lite.aggregators._quantile import (
  PrivateQuantileEstimationProcess,
  QuantileEstimatorState,
  build_quantile_estimator,
)
from fedjax_lite.aggregators._robust import (
  clipping_factory,
  global_norm,
  krum_factory,
  median_factory,
  trimmed_mean_factory,
  zeroing_factory,
)
from fedjax_lite.aggregators._secure import SecureSumFactory

__all__ = [
  'CorrelatedNoiseMechanism',
  'DPFTRLAccountant',
  'DPFTRLFactory',
  'DPFTRLState',
  'DPState',
  'DifferentiallyPrivateFactory',
  'MeanFactory',
  'PrivacyAccountant',
  'PrivateQuantileEstimationProcess',
  'QuantileEstimatorState',
  'QuantizationFactory',
  'QuantizationState',
  'SecureSumFactory',
  'SumFactory',
  'UnweightedMeanFactory',
  'build_dp_ftrl_mechanism',
  'build_quantile_estimator',
  'clipping_factory',
  'compression_aggregator',
  'default_clipping',
  'default_zeroing',
  'dp_aggregator',
  'dp_ftrl_aggregator',
  'global_norm',
  'krum_factory',
  'median_factory',
  'robust_aggregator',
  'secure_aggregator',
  'trimmed_mean_factory',
  'zeroing_factory',
]
