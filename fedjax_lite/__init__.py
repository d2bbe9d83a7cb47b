"""fedjax_lite: TensorFlow Federated's learning API as pure, JAX-native functions."""

from fedjax_lite import (
  aggregators,
  algorithms,
  data,
  metrics,
  models,
  optimizers,
  reconstruction,
  simulation,
  tasks,
  templates,
)
from fedjax_lite.data import ClientBatches
from fedjax_lite.models import BatchOutput, FunctionalModel, ModelWeights
from fedjax_lite.templates import ClientWeighting, LearningProcess, LearningProcessOutput

__version__ = '0.1.0'

__all__ = [
  'BatchOutput',
  'ClientBatches',
  'ClientWeighting',
  'FunctionalModel',
  'LearningProcess',
  'LearningProcessOutput',
  'ModelWeights',
  'aggregators',
  'algorithms',
  'data',
  'metrics',
  'models',
  'optimizers',
  'reconstruction',
  'simulation',
  'tasks',
  'templates',
]
