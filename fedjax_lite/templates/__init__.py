"""Process templates, their validation errors, and the building blocks of learning processes."""

from fedjax_lite.templates._client_work import (
  ClientWeighting,
  ClientWorkState,
  build_model_delta_client_work,
)
from fedjax_lite.templates._composers import LearningAlgorithmState, compose_learning_process
from fedjax_lite.templates._distributors import build_broadcast_process
from fedjax_lite.templates._errors import (
  LearningProcessOutputError,
  LearningProcessPlacementError,
  LearningProcessSequenceTypeError,
  TemplateInitFnParamNotEmptyError,
  TemplateNextFnNumArgsError,
  TemplateNotMeasuredProcessOutputError,
  TemplateStateNotAssignableError,
)
from fedjax_lite.templates._finalizers import build_apply_optimizer_finalizer
from fedjax_lite.templates._processes import (
  AggregationProcess,
  ClientResult,
  ClientWorkProcess,
  DistributionProcess,
  FinalizerProcess,
  IterativeProcess,
  LearningProcess,
  LearningProcessOutput,
  MeasuredProcess,
  MeasuredProcessOutput,
)

__all__ = [
  'AggregationProcess',
  'ClientResult',
  'ClientWeighting',
  'ClientWorkProcess',
  'ClientWorkState',
  'DistributionProcess',
  'FinalizerProcess',
  'IterativeProcess',
  'LearningAlgorithmState',
  'LearningProcess',
  'LearningProcessOutput',
  'LearningProcessOutputError',
  'LearningProcessPlacementError',
  'LearningProcessSequenceTypeError',
  'MeasuredProcess',
  'MeasuredProcessOutput',
  'TemplateInitFnParamNotEmptyError',
  'TemplateNextFnNumArgsError',
  'TemplateNotMeasuredProcessOutputError',
  'TemplateStateNotAssignableError',
  'build_apply_optimizer_finalizer',
  'build_broadcast_process',
  'build_model_delta_client_work',
  'compose_learning_process',
]
