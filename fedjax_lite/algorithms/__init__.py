"""Federated algorithms, each a short composition of templates."""

from fedjax_lite.algorithms._adaptive import build_fed_adagrad, build_fed_adam, build_fed_yogi
from fedjax_lite.algorithms._fed_avg import build_unweighted_fed_avg, build_weighted_fed_avg
from fedjax_lite.algorithms._fed_eval import build_fed_eval
from fedjax_lite.algorithms._fed_kmeans import build_fed_kmeans, kmeans_model
from fedjax_lite.algorithms._fed_prox import build_unweighted_fed_prox, build_weighted_fed_prox
from fedjax_lite.algorithms._fed_sgd import build_fed_sgd
from fedjax_lite.algorithms._mime import (
  build_mime,
  build_unweighted_mime_lite,
  build_weighted_mime_lite,
)
from fedjax_lite.algorithms._personalization_eval import (
  Personalization,
  PersonalizationEvalOutput,
  build_personalization_eval,
)
from fedjax_lite.algorithms._scaffold import build_scaffold
from fedjax_lite.algorithms._schedules import build_weighted_fed_avg_with_optimizer_schedule

__all__ = [
  'Personalization',
  'PersonalizationEvalOutput',
  'build_fed_adagrad',
  'build_fed_adam',
  'build_fed_eval',
  'build_fed_kmeans',
  'build_fed_sgd',
  'build_fed_yogi',
  'build_mime',
  'build_personalization_eval',
  'build_scaffold',
  'build_unweighted_fed_avg',
  'build_unweighted_fed_prox',
  'build_unweighted_mime_lite',
  'build_weighted_fed_avg',
  'build_weighted_fed_avg_with_optimizer_schedule',
  'build_weighted_fed_prox',
  'build_weighted_mime_lite',
  'kmeans_model',
]
