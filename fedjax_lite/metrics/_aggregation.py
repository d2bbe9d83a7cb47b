"""Metric aggregators: from per-client unfinalized metric states to cohort metrics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedjax_lite import tree as tree_lib


def sum_then_finalize(finalize: Callable[[Any], Any]) -> Callable[[Any], Any]:
  """Sums client metric states over the client axis, then finalizes once (TFF's default).

  Args:
    finalize: `(state) -> metrics` for one (summed) state.

  Returns:
    `(client_states) -> metrics`, client_states' leaves shaped `[clients, ...]`.
  """

  def aggregate(client_states):
    return finalize(tree_lib.tree_sum_over_clients(client_states))

  return aggregate
