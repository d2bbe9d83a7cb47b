"""Process templates, their validation errors, and the building blocks of learning processes."""

from fedjax_lite.templates._client_work import (
  ClientLoop,
  ClientOutput,
  ClientWeighting,
  ClientWorkState,
  build_client_work,
  build_model_delta_client_work,
  masked_forward,
  masked_grad,
  optimizer_step,
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
from fedjax_lite.templates._finalizers import (
  build_apply_optimizer_finalizer,
  build_identity_finalizer,
)
from fedjax_lite.templates._processes import (
  AggregationProcess,
  ClientResult,
  ClientWorkProcess,
  DistributionProcess,
  EstimationProcess,
  FinalizerProcess,
  IterativeProcess,
  LearningProcess,
  LearningProcessOutput,
  MeasuredProcess,
  MeasuredProcessOutput,
  StreamedClientResult,
)

__all__ = [
  'AggregationProcess',
  'ClientLoop',
  'ClientOutput',
  'ClientResult',
  'ClientWeighting',
  'ClientWorkProcess',
  'ClientWorkState',
  'DistributionProcess',
  'EstimationProcess',
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
  'StreamedClientResult',
  'TemplateInitFnParamNotEmptyError',
  'TemplateNextFnNumArgsError',
  'TemplateNotMeasuredProcessOutputError',
  'TemplateStateNotAssignableError',
  'build_apply_optimizer_finalizer',
  'build_broadcast_process',
  'build_client_work',
  'build_identity_finalizer',
  'build_model_delta_client_work',
  'compose_learning_process',
  'masked_forward',
  'masked_grad',
  'optimizer_step',
]
