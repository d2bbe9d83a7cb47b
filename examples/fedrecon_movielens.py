"""Federated Reconstruction for matrix factorization on MovieLens-100K (Singhal et al., 2021).

Each user is a client. The item embeddings and biases are global (averaged on the server); each
user's embedding and bias are local: rebuilt on the user's device every round from their own
ratings, never sent anywhere. Users are split 80/20 (seeded) into training users and held-out
users who never take part in training. A held-out user's ratings, shuffled once, are cut into
batches; even batches are the reconstruction part, odd batches the evaluation part.

Three ways of predicting a held-out user's evaluation ratings, all from the same data:

- per-user mean: the mean of the user's reconstruction ratings (no collaboration at all);
- FedRecon: the trained global weights, the user's local weights reconstructed on their
  reconstruction part (`fl.reconstruction.build_fed_recon_eval`);
- centralized MF: one matrix factorization (same dimension, with biases) trained on a server that
  holds every training user's ratings and the held-out users' reconstruction ratings — the
  non-private upper reference.

Metrics: RMSE, and rating accuracy = fraction with |prediction − rating| <= 0.5 (the paper's and
TFF's tutorial metric: the prediction rounds to the true rating).

    python examples/fedrecon_movielens.py                  # about 1 minute on 2 CPU cores
    python examples/fedrecon_movielens.py --rounds 300 --out /tmp/fedrecon.json

It prints a table and writes JSON (default `benchmarks/results/fedrecon_movielens.json`); the
reference run is `benchmarks/reference/fedrecon_movielens_cpu2_2026-11-22.json`.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fedjax_lite as fl
import fedjax_lite.reconstruction


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--rounds', type=int, default=1500)
  parser.add_argument('--clients-per-round', type=int, default=50)
  parser.add_argument('--dim', type=int, default=50)
  parser.add_argument('--batch-size', type=int, default=5)
  parser.add_argument('--max-steps', type=int, default=24, help='batches per client and round')
  parser.add_argument('--client-lr', type=float, default=0.5)
  parser.add_argument('--recon-lr', type=float, default=0.1)
  parser.add_argument('--server-lr', type=float, default=1.0)
  parser.add_argument('--eval-recon-epochs', type=int, default=5)
  parser.add_argument('--held-out-fraction', type=float, default=0.2)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--out', default='benchmarks/results/fedrecon_movielens.json')
  return parser.parse_args()


def user_datasets(ratings, users):
  """One `{'x': item ids, 'y': ratings}` per user, in file order."""
  order = np.argsort(ratings['user_id'], kind='stable')
  starts = np.searchsorted(ratings['user_id'][order], users)
  ends = np.searchsorted(ratings['user_id'][order], users, side='right')
  return [
    {'x': ratings['item_id'][order[a:b]], 'y': ratings['rating'][order[a:b]]}
    for a, b in zip(starts, ends, strict=True)
  ]


def part_examples(batches):
  """The real examples of each client of a `ClientBatches`: a list of `(items, ratings)`."""
  mask = np.asarray(batches.mask) > 0
  x, y = np.asarray(batches.batch['x']), np.asarray(batches.batch['y'])
  return [(x[c][mask[c]], y[c][mask[c]]) for c in range(mask.shape[0])]


def scores(predictions, ratings):
  error = predictions - ratings
  return {
    'rmse': float(np.sqrt(np.mean(error**2))),
    'rating_accuracy': float(np.mean(np.abs(error) <= 0.5)),
    'num_examples': len(ratings),
  }


def centralized_mf(num_users, num_items, train_users, train_data, held_users, recon_parts, args):
  """Matrix factorization trained on one server holding all the given ratings.

  Ratings: every training user's, plus each held-out user's reconstruction part. Loss: squared
  error plus 0.1 × the squared norms of the example's user and item embeddings and biases
  (Funk's regularized SVD; tuned over 0.02–0.3); Adam 0.005 on minibatches of 256, 15 epochs,
  one `lax.scan` per epoch.
  """
  users = np.concatenate(
    [np.full(len(d['y']), u) for u, d in zip(train_users, train_data, strict=True)]
    + [np.full(len(r), u) for u, (_, r) in zip(held_users, recon_parts, strict=True)]
  ).astype(np.int32)
  items = np.concatenate([d['x'] for d in train_data] + [i for i, _ in recon_parts])
  ratings = np.concatenate([d['y'] for d in train_data] + [r for _, r in recon_parts])
  users, items, ratings = jnp.asarray(users), jnp.asarray(items), jnp.asarray(ratings)
  model = fl.models.matrix_factorization(num_users, num_items, args.dim, seed=args.seed)
  optimizer = optax.adam(0.005)
  batch, l2 = 256, 0.1
  steps = len(ratings) // batch

  def loss(trainable, idx):
    u, i = users[idx], items[idx]
    predictions = model.predict_on_batch(
      fl.ModelWeights(trainable, ()), {'user_id': u, 'item_id': i}
    )
    norms = (
      jnp.sum(trainable['user_embedding'][u] ** 2, axis=1)
      + jnp.sum(trainable['item_embedding'][i] ** 2, axis=1)
      + trainable['user_bias'][u] ** 2
      + trainable['item_bias'][i] ** 2
    )
    return jnp.mean((predictions - ratings[idx]) ** 2 + l2 * norms)

  @jax.jit
  def epoch(carry, perm):
    def step(carry, idx):
      trainable, opt_state = carry
      updates, opt_state = optimizer.update(jax.grad(loss)(trainable, idx), opt_state, trainable)
      return (optax.apply_updates(trainable, updates), opt_state), None

    carry, _ = jax.lax.scan(step, carry, perm[: steps * batch].reshape(steps, batch))
    return carry

  trainable = model.initial_weights.trainable
  carry = (trainable, optimizer.init(trainable))
  rng = np.random.default_rng(args.seed)
  for _ in range(15):
    carry = epoch(carry, jnp.asarray(rng.permutation(len(ratings)), jnp.int32))
  return model, fl.ModelWeights(carry[0], ())


def main():
  args = parse_args()
  start = time.time()
  ratings = fl.data.load_movielens_100k()
  num_users, num_items = int(ratings['user_id'].max()) + 1, int(ratings['item_id'].max()) + 1
  perm = np.random.default_rng(args.seed).permutation(num_users)
  num_held = round(args.held_out_fraction * num_users)
  held_users, train_users = np.sort(perm[:num_held]), np.sort(perm[num_held:])
  train_data = user_datasets(ratings, train_users)
  held_data = user_datasets(ratings, held_users)

  # The model: one user's matrix factorization; the user's embedding and bias are local.
  model = fl.models.matrix_factorization(1, num_items, args.dim, personal=True, seed=args.seed)
  recon = fl.reconstruction.ReconstructionModel(model, lambda path: 'user' in path)
  process = fl.reconstruction.build_fed_recon(
    recon,
    server_optimizer=fl.optimizers.build_sgdm(args.server_lr),
    client_optimizer=fl.optimizers.build_sgdm(args.client_lr),
    reconstruction_optimizer=fl.optimizers.build_sgdm(args.recon_lr),
    dataset_split_fn=fl.reconstruction.build_dataset_split_fn(split_dataset=True),
  )

  # Held-out users: shuffled once, batched; even batches reconstruct, odd batches evaluate.
  held = fl.data.build_client_batches(held_data, batch_size=args.batch_size, seed=args.seed + 1)
  recon_part, eval_part = fl.reconstruction.build_dataset_split_fn(split_dataset=True)(held)
  recon_parts, eval_parts = part_examples(recon_part), part_examples(eval_part)
  eval_ratings = np.concatenate([r for _, r in eval_parts])
  evaluation = fl.reconstruction.build_fed_recon_eval(
    recon,
    reconstruction_optimizer=fl.optimizers.build_sgdm(args.recon_lr),
    dataset_split_fn=fl.reconstruction.build_dataset_split_fn(
      recon_epochs=args.eval_recon_epochs, split_dataset=True
    ),
  )

  def evaluate(state):
    eval_state = evaluation.set_model_weights(
      evaluation.initialize(), process.get_model_weights(state)
    )
    _, metrics = evaluation.next(eval_state, held)
    m = metrics['client_work']['eval']['current_round_metrics']
    return {k: float(m[k]) for k in ('rmse', 'rating_accuracy', 'num_examples')}

  state = process.initialize()
  history = []
  train_start = time.time()
  for round_num in range(1, args.rounds + 1):
    cohort = np.random.default_rng([args.seed, round_num]).choice(
      len(train_data), args.clients_per_round, replace=False
    )
    batches = fl.data.build_client_batches(
      [train_data[i] for i in cohort],
      batch_size=args.batch_size,
      max_steps=args.max_steps,
      num_steps=args.max_steps,
      seed=(args.seed, round_num),
    )
    state, metrics = process.next(state, batches)
    if round_num % 250 == 0 or round_num == args.rounds:
      train = metrics['client_work']['train']
      held_metrics = evaluate(state)
      history.append({'round': round_num, 'train_rmse': float(train['rmse']), **held_metrics})
      print(
        f'round {round_num:4d}  train rmse {float(train["rmse"]):.4f}  held-out rmse '
        f'{held_metrics["rmse"]:.4f}  accuracy {held_metrics["rating_accuracy"]:.4f}'
      )
  train_seconds = time.time() - train_start
  fedrecon = evaluate(state)

  # Baseline (a): each held-out user's mean reconstruction rating (global mean if none).
  global_mean = float(np.mean(np.concatenate([d['y'] for d in train_data])))
  user_means = [np.mean(r) if len(r) else global_mean for _, r in recon_parts]
  mean_predictions = np.concatenate(
    [np.full(len(r), m) for m, (_, r) in zip(user_means, eval_parts, strict=True)]
  )
  per_user_mean = scores(mean_predictions, eval_ratings)

  # Baseline (b): centralized MF on all training ratings + held-out reconstruction ratings.
  central_model, central_weights = centralized_mf(
    num_users, num_items, train_users, train_data, held_users, recon_parts, args
  )
  eval_users = np.concatenate(
    [np.full(len(i), u, np.int32) for u, (i, _) in zip(held_users, eval_parts, strict=True)]
  )
  eval_items = np.concatenate([i for i, _ in eval_parts])
  central_predictions = np.asarray(
    central_model.predict_on_batch(central_weights, {'user_id': eval_users, 'item_id': eval_items})
  )
  centralized = scores(central_predictions, eval_ratings)

  rows = [
    ('per-user mean (reconstruction part)', per_user_mean),
    (f'FedRecon ({args.rounds} rounds x {args.clients_per_round} clients)', fedrecon),
    ('centralized MF (non-private reference)', centralized),
  ]
  print(f'\nheld-out users: {len(held_users)}, evaluation ratings: {len(eval_ratings)}')
  print('| method | RMSE | rating accuracy |\n|---|---|---|')
  for name, m in rows:
    print(f'| {name} | {m["rmse"]:.4f} | {m["rating_accuracy"]:.4f} |')
  result = {
    'args': vars(args),
    'num_train_users': len(train_users),
    'num_held_out_users': len(held_users),
    'num_eval_ratings': len(eval_ratings),
    'per_user_mean': per_user_mean,
    'fedrecon': fedrecon,
    'centralized_mf': centralized,
    'history': history,
    'train_seconds': train_seconds,
    'total_seconds': time.time() - start,
  }
  pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(result, f, indent=2)
  print(
    f'FedRecon training {train_seconds:.0f} s, total {result["total_seconds"]:.0f} s; '
    f'wrote {args.out}'
  )


if __name__ == '__main__':
  main()
