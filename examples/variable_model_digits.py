"""A TFF variable model ported line by line to flax nnx, trained with FedAvg on digits.

The TFF original (`tff.learning.models.VariableModel`; docs/variable_model.md shows both side by
side) is a Keras-style 64-32-10 classifier whose local variables count the loss, the examples
and the correct predictions, and which also reports the L2 norm of the trained model:

    class DigitsModel(tff.learning.models.VariableModel):
      def __init__(self):
        self._hidden = tf.keras.layers.Dense(32, activation='relu')
        self._logits = tf.keras.layers.Dense(10)
        self._hidden.build((None, 64))
        self._logits.build((None, 32))
        self._loss_sum = tf.Variable(0.0, trainable=False)
        self._num_examples = tf.Variable(0.0, trainable=False)
        self._num_correct = tf.Variable(0.0, trainable=False)

      trainable_variables = property(lambda self: self._hidden.trainable_variables
                                     + self._logits.trainable_variables)
      non_trainable_variables = property(lambda self: [])
      local_variables = property(lambda self: [self._loss_sum, self._num_examples,
                                               self._num_correct])
      input_spec = property(lambda self: collections.OrderedDict(
          x=tf.TensorSpec([None, 64], tf.float32), y=tf.TensorSpec([None], tf.int32)))

      @tf.function
      def forward_pass(self, batch, training=True):
        logits = self._logits(self._hidden(batch['x']))
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(batch['y'], logits))
        n = tf.cast(tf.shape(batch['y'])[0], tf.float32)
        correct = tf.equal(tf.argmax(logits, -1, output_type=tf.int32), batch['y'])
        self._loss_sum.assign_add(loss * n)
        self._num_examples.assign_add(n)
        self._num_correct.assign_add(tf.reduce_sum(tf.cast(correct, tf.float32)))
        return tff.learning.models.BatchOutput(loss=loss, predictions=logits, num_examples=n)

      @tf.function
      def report_local_unfinalized_metrics(self):
        return collections.OrderedDict(
            loss=[self._loss_sum, self._num_examples],
            accuracy=[self._num_correct, self._num_examples],
            model_l2_norm=[tf.linalg.global_norm(self.trainable_variables), 1.0])

      def metric_finalizers(self):
        mean = tf.function(lambda s: s[0] / s[1])
        return collections.OrderedDict(loss=mean, accuracy=mean, model_l2_norm=mean)
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import fedjax_lite as fl


def _mean(state):
  return state[0] / state[1]


class DigitsModel(nnx.Module):
  """The TFF model above as an nnx module: same variables, same methods."""

  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(64, 32, rngs=rngs)
    self.logits = nnx.Linear(32, 10, rngs=rngs)
    self.loss_sum = fl.models.LocalVariable(jnp.zeros(()))
    self.num_examples = fl.models.LocalVariable(jnp.zeros(()))
    self.num_correct = fl.models.LocalVariable(jnp.zeros(()))
    self.input_spec = {
      'x': jax.ShapeDtypeStruct((None, 64), jnp.float32),
      'y': jax.ShapeDtypeStruct((None,), jnp.int32),
    }

  def forward_pass(self, batch, training=True):
    logits = self.logits(nnx.relu(self.hidden(batch['x'])))
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['y']).mean()
    n = batch['y'].shape[0]
    correct = jnp.argmax(logits, -1) == batch['y']
    self.loss_sum[...] += loss * n
    self.num_examples[...] += n
    self.num_correct[...] += jnp.sum(correct)
    return fl.BatchOutput(loss=loss, predictions=logits, num_examples=n)

  def report_local_unfinalized_metrics(self):
    params = jax.tree.leaves(nnx.state(self, nnx.Param))
    return {
      'loss': (self.loss_sum[...], self.num_examples[...]),
      'accuracy': (self.num_correct[...], self.num_examples[...]),
      'model_l2_norm': (optax.global_norm(params), 1.0),
    }

  def metric_finalizers(self):
    return {'loss': _mean, 'accuracy': _mean, 'model_l2_norm': _mean}


def main(rounds: int = 20) -> dict:
  x, y = fl.data.load_digits()
  (x_train, y_train), (x_test, y_test) = fl.data.train_test_split(x, y, seed=0)
  parts = fl.data.dirichlet_label_partition(y_train, num_clients=30, alpha=0.5, seed=0)
  clients = [{'x': x_train[p], 'y': y_train[p]} for p in parts]

  model = fl.models.from_variable_model(DigitsModel(nnx.Rngs(0)))
  process = fl.algorithms.build_weighted_fed_avg(model, fl.optimizers.build_sgdm(0.1))
  num_steps = -(-max(map(len, parts)) * 2 // 16)  # 2 epochs of batch 16: one shape
  state = process.initialize()
  for round_num in range(1, rounds + 1):
    cohort = np.random.default_rng([0, round_num]).choice(len(clients), 10, replace=False)
    batches = fl.data.build_client_batches(
      [clients[i] for i in cohort], batch_size=16, num_epochs=2, num_steps=num_steps,
      seed=(0, round_num),
    )  # fmt: skip
    state, metrics = process.next(state, batches)
    train = metrics['client_work']['train']
    print(
      f'round {round_num:2d}  loss {train["loss"]:.4f}  accuracy {train["accuracy"]:.4f}  '
      f'mean client model L2 norm {train["model_l2_norm"]:.3f}'
    )

  evaluation = fl.algorithms.build_fed_eval(model)
  eval_state = evaluation.set_model_weights(
    evaluation.initialize(), process.get_model_weights(state)
  )
  test = fl.data.build_client_batches([{'x': x_test, 'y': y_test}], batch_size=len(y_test))
  _, eval_metrics = evaluation.next(eval_state, test)
  result = eval_metrics['client_work']['eval']['current_round_metrics']
  print(f'test accuracy {result["accuracy"]:.4f}')
  return result


if __name__ == '__main__':
  main()
