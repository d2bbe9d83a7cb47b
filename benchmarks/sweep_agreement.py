"""How far swept runs part from the same settings trained alone, round by round.

`fedjax-lite train`'s default job (MLP on digits), 3 client learning rates x 3 seeds, each run
trained alone and inside sweeps of five layouts: one program of 9 runs vectorized together
(`runs_per_lane=None`, an accelerator's default), and with the backend's default lanes (on a CPU
one run at a time inside the program) one program of 9 runs, programs of 3 (by seed), programs
of 2 and programs of 1. Prints and writes, per layout and round, the largest difference
over the 9 runs in any weight, in the training loss and in the test loss and accuracy. The
figures in docs/simulation.md ("Sweeps") come from this script.

Usage:
  python benchmarks/sweep_agreement.py [ROUNDS] [--out benchmarks/results/sweep_agreement.json]
"""

import json
import os
import sys

import jax
import numpy as np

from fedjax_lite import _catalogue, _config, _experiment, simulation, templates

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 and not sys.argv[1].startswith('-') else 30
OUT = sys.argv[sys.argv.index('--out') + 1] if '--out' in sys.argv else None
lrs = [0.03, 0.1, 0.3]
seeds = [0, 1, 2]
configs = []
for lr in lrs:
  for s in seeds:
    point = {'client_lr': lr, 'seed': s, 'rounds': ROUNDS}
    configs.append(_catalogue.with_defaults(_config.resolve({}, point), set(point)))
exps = {
  s: _experiment.build_experiment(configs[[c['seed'] for c in configs].index(s)]) for s in seeds
}


def hp(c):
  return {'client_work': {'learning_rate': c['client_lr']}}


def sweep_states(idx, runs_per_lane='auto'):
  """Runs configs[idx] as one program; returns per-round list of (states, metrics)."""
  cs = [configs[i] for i in idx]
  runs = [templates.SweepRun(c['seed'], hp(c)) for c in cs]
  sweep = templates.build_sweep(lambda seed: exps[seed].process, runs, runs_per_lane=runs_per_lane)
  state = sweep.initialize()
  out = []
  sds = [c['seed'] for c in cs]
  for r in range(1, ROUNDS + 1):
    if len(set(sds)) == 1:
      data = exps[sds[0]].training_data_fn(r)
    else:
      data = simulation.stack_client_batches([exps[s].training_data_fn(r) for s in sds])
    state, m = sweep.next(state, data)
    out.append((sweep.unstack(jax.device_get(state)), sweep.unstack(jax.device_get(m))))
  return out


def alone(i):
  c = configs[i]
  e = exps[c['seed']]
  p = e.process
  state = p.set_hparams(p.initialize(), hp(c))
  out = []
  for r in range(1, ROUNDS + 1):
    state, m = p.next(state, e.training_data_fn(r))
    out.append((jax.device_get(state), jax.device_get(m)))
  return out


def evaluate(i, state):
  e = exps[configs[i]['seed']]
  return simulation.flatten_metrics(e.evaluation_fn(state, e.evaluation_data))


ref = {i: alone(i) for i in range(len(configs))}
layouts = {
  'all9_vectorized': [list(range(9))],
  'all9': [list(range(9))],
  'by_seed3': [[j for j in range(9) if configs[j]['seed'] == s] for s in seeds],
  'pairs': [[0, 1], [2, 3], [4, 5], [6, 7], [8]],
  'single': [[j] for j in range(9)],
}
results = {}
for name, groups in layouts.items():
  per_round = []
  sw = {}
  for g in groups:
    outs = sweep_states(g, None if name.endswith('_vectorized') else 'auto')
    for k, i in enumerate(g):
      sw[i] = [(st[k], me[k]) for st, me in outs]
  for r in range(ROUNDS):
    dw = dl = dtl = dacc = 0.0
    acc_equal = True
    for i in range(9):
      (s1, m1), (s2, m2) = sw[i][r], ref[i][r]
      w1 = jax.tree.leaves(exps[0].process.get_model_weights(s1))
      w2 = jax.tree.leaves(exps[0].process.get_model_weights(s2))
      dw = max(
        dw,
        max(
          float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(w1, w2, strict=True)
        ),
      )
      f1, f2 = simulation.flatten_metrics(m1), simulation.flatten_metrics(m2)
      dtl = max(dtl, abs(f1['client_work/train/loss'] - f2['client_work/train/loss']))
      if r + 1 in (1, 2, 3, 5, 10, 15, 20, 30) or r + 1 == ROUNDS:
        e1, e2 = evaluate(i, s1), evaluate(i, s2)
        dl = max(dl, abs(e1['loss'] - e2['loss']))
        dacc = max(dacc, abs(e1['accuracy'] - e2['accuracy']))
    per_round.append(
      {'round': r + 1, 'weights': dw, 'train_loss': dtl, 'test_loss': dl, 'test_acc': dacc}
    )
  results[name] = per_round
  print(name, flush=True)
  for row in per_round:
    if row['round'] in (1, 2, 3, 5, 10, 15, 20, 30):
      print('  ', json.dumps(row), flush=True)
if OUT:
  os.makedirs(os.path.dirname(OUT) or '.', exist_ok=True)
  with open(OUT, 'w') as f:
    json.dump(results, f, indent=1)
