"""Models: `ModelWeights`, `BatchOutput`, `FunctionalModel`, `from_flax`, masked losses."""

from fedjax_lite.models._cnn import cnn_classifier
from fedjax_lite.models._conv import conv_general_dilated
from fedjax_lite.models._conv_dropout import ConvDropoutCNN
from fedjax_lite.models._flax import from_flax
from fedjax_lite.models._losses import mean_squared_error, softmax_cross_entropy, weighted_mean
from fedjax_lite.models._matrix_factorization import matrix_factorization, rating_metrics
from fedjax_lite.models._mlp import mlp_classifier
from fedjax_lite.models._model import BatchOutput, FunctionalModel, ModelWeights, split_batch
from fedjax_lite.models._padding import check_padding_invariance
from fedjax_lite.models._precision import with_compute_dtype
from fedjax_lite.models._recurrent import (
  LSTMLanguageModel,
  input_masked_token_cross_entropy,
  masked_token_cross_entropy,
  unit_forget_bias,
)
from fedjax_lite.models._resnet import ResNetGN, l2_regularization
from fedjax_lite.models._variable_model import LocalVariable, from_variable_model

__all__ = [
  'BatchOutput',
  'ConvDropoutCNN',
  'FunctionalModel',
  'LSTMLanguageModel',
  'LocalVariable',
  'ModelWeights',
  'ResNetGN',
  'check_padding_invariance',
  'cnn_classifier',
  'conv_general_dilated',
  'from_flax',
  'from_variable_model',
  'input_masked_token_cross_entropy',
  'l2_regularization',
  'masked_token_cross_entropy',
  'matrix_factorization',
  'mean_squared_error',
  'mlp_classifier',
  'rating_metrics',
  'softmax_cross_entropy',
  'split_batch',
  'unit_forget_bias',
  'weighted_mean',
  'with_compute_dtype',
]
