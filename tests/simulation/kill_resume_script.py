"""Runs `simulation_problem.run_experiment` in its own process, for the test that kills it.

Usage: python kill_resume_script.py RUN_DIR TOTAL_ROUNDS SECONDS_PER_ROUND
Writes RUN_DIR/final.npz (the final model weights' leaves) when the run completes.
"""

import os
import sys
import time

import jax
import numpy as np
import simulation_problem


def main():
  run_dir, total_rounds, delay = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
  problem = simulation_problem.make_problem()
  training_selection_fn = problem[1]

  def slow_selection_fn(round_num):
    time.sleep(delay)
    return training_selection_fn(round_num)

  state = simulation_problem.run_experiment(
    problem, run_dir, total_rounds, selection_fn=slow_selection_fn
  )
  leaves = jax.tree.leaves(problem[0].get_model_weights(state))
  np.savez(os.path.join(run_dir, 'final.npz'), *map(np.asarray, leaves))


if __name__ == '__main__':
  main()
