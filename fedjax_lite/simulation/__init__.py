"""The training loop driver around compiled rounds: evaluation schedule, checkpoint/resume,
metrics managers, progress and plots (TFF's `tff.simulation`)."""

from fedjax_lite.simulation import _multihost as multihost
from fedjax_lite.simulation._checkpoint import FileCheckpointManager
from fedjax_lite.simulation._client_states import (
  ClientStateStore,
  ClientStateStoreError,
  InMemoryClientStateStore,
  SQLiteClientStateStore,
)
from fedjax_lite.simulation._lock import RunFolderInUseError, RunFolderLock
from fedjax_lite.simulation._metrics_managers import (
  CSVMetricsManager,
  InMemoryMetricsManager,
  JSONLMetricsManager,
  MetricsManager,
  TensorBoardMetricsManager,
  flatten_metrics,
  load_metrics,
)
from fedjax_lite.simulation._plot import plot_run
from fedjax_lite.simulation._progress import CompileTimer
from fedjax_lite.simulation._runs import Run, load_run
from fedjax_lite.simulation._sweep import run_sweep, stack_client_batches
from fedjax_lite.simulation._training_loop import build_evaluation_fn, run_training_process

__all__ = [
  'CSVMetricsManager',
  'ClientStateStore',
  'ClientStateStoreError',
  'CompileTimer',
  'FileCheckpointManager',
  'InMemoryClientStateStore',
  'InMemoryMetricsManager',
  'JSONLMetricsManager',
  'MetricsManager',
  'Run',
  'RunFolderInUseError',
  'RunFolderLock',
  'SQLiteClientStateStore',
  'TensorBoardMetricsManager',
  'build_evaluation_fn',
  'flatten_metrics',
  'load_metrics',
  'load_run',
  'multihost',
  'plot_run',
  'run_sweep',
  'run_training_process',
  'stack_client_batches',
]
