"""Functional metrics and metric aggregators."""

from fedjax_lite.metrics._aggregation import sum_then_finalize
from fedjax_lite.metrics._baseline_metrics import (
  masked_token_accuracy,
  num_tokens,
  precision,
  recall_at_k,
)
from fedjax_lite.metrics._functional import (
  FunctionalMetric,
  create_functional_metric_fns,
  loss,
  mean_absolute_error,
  mean_squared_error,
  num_batches,
  num_examples,
  sparse_categorical_accuracy,
)

__all__ = [
  'FunctionalMetric',
  'create_functional_metric_fns',
  'loss',
  'masked_token_accuracy',
  'mean_absolute_error',
  'mean_squared_error',
  'num_batches',
  'num_examples',
  'num_tokens',
  'precision',
  'recall_at_k',
  'sparse_categorical_accuracy',
  'sum_then_finalize',
]
