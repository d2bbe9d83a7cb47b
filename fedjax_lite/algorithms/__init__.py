"""Federated algorithms, each a short composition of templates."""

from fedjax_lite.algorithms._fed_avg import build_unweighted_fed_avg, build_weighted_fed_avg
from fedjax_lite.algorithms._fed_eval import build_fed_eval
from fedjax_lite.algorithms._fed_sgd import build_fed_sgd

__all__ = [
  'build_fed_eval',
  'build_fed_sgd',
  'build_unweighted_fed_avg',
  'build_weighted_fed_avg',
]
