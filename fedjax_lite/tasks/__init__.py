"""TFF's baseline tasks (`tff.simulation.baselines`): data, model, metrics and a paper's defaults.

Example:
  >>> task = fl.tasks.get_task('shakespeare_character')
  >>> data = task.stand_in(num_clients=2) if not task.available() else task.load()
  >>> model = task.model(seed=0)
  >>> task.defaults['client_lr'], task.metric_names
"""

from __future__ import annotations

import types
from collections.abc import Mapping

from fedjax_lite.tasks._cifar100 import cifar100
from fedjax_lite.tasks._emnist import emnist_character
from fedjax_lite.tasks._shakespeare import shakespeare_character
from fedjax_lite.tasks._stackoverflow import stackoverflow_tag, stackoverflow_word
from fedjax_lite.tasks._task import DEFAULT_KEYS, DataFile, Task, TaskData

TASKS: Mapping[str, Task] = types.MappingProxyType(
  {
    task.name: task
    for task in (
      emnist_character(),
      emnist_character(only_digits=True),
      shakespeare_character(),
      stackoverflow_word(),
      stackoverflow_tag(),
      cifar100(),
    )
  }
)


def get_task(name: str) -> Task:
  """The registered task `name` (a key of `TASKS`)."""
  if name not in TASKS:
    raise ValueError(f'unknown task {name!r}; expected one of {", ".join(TASKS)}')
  return TASKS[name]


__all__ = [
  'DEFAULT_KEYS',
  'TASKS',
  'DataFile',
  'Task',
  'TaskData',
  'cifar100',
  'emnist_character',
  'get_task',
  'shakespeare_character',
  'stackoverflow_tag',
  'stackoverflow_word',
]
