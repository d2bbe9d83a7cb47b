"""Device-local sharding (8 forced CPU devices): each device runs its own clients, the sums are
combined once per round, and the result equals the single-device round."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest
from jax.sharding import Mesh

import fedjax_lite as fl

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason='needs 8 devices (conftest.py)')

# 13 clients: does not divide by 8, so the cohort is padded with empty clients.
SIZES = [3, 9, 4, 12, 7, 1, 5, 8, 0, 6, 2, 10, 4]


def _mesh():
  return Mesh(np.array(jax.devices()[:8]), ('clients',))


def _recon_model():
  base = ref.linear_model(5, 3)
  return fl.reconstruction.ReconstructionModel(base, fl.ModelWeights({'w': False, 'b': True}, ()))


BUILDERS = {
  'fed_avg': lambda mesh: fl.algorithms.build_weighted_fed_avg(
    ref.linear_model(5, 3), fl.optimizers.build_sgdm(0.1, momentum=0.9), mesh=mesh
  ),
  'fed_sgd': lambda mesh: fl.algorithms.build_fed_sgd(ref.linear_model(5, 3), mesh=mesh),
  'fed_eval': lambda mesh: fl.algorithms.build_fed_eval(ref.linear_model(5, 3), mesh=mesh),
  'fed_recon': lambda mesh: fl.reconstruction.build_fed_recon(
    _recon_model(), client_optimizer=fl.optimizers.build_sgdm(0.1), mesh=mesh
  ),
  'fed_recon_eval': lambda mesh: fl.reconstruction.build_fed_recon_eval(_recon_model(), mesh=mesh),
}


def _batches():
  return fl.data.build_client_batches(
    ref.random_clients(SIZES), batch_size=4, num_epochs=2, client_keys=range(100, 113)
  )


@pytest.mark.parametrize('name', sorted(BUILDERS))
def test_sharded_round_equals_single_device(name):
  single, sharded = BUILDERS[name](None), BUILDERS[name](_mesh())
  batches = _batches()
  s1, s2 = single.initialize(), sharded.initialize()
  for _ in range(2):
    s1, m1 = single.next(s1, batches)
    s2, m2 = sharded.next(s2, batches)
  for a, b in zip(jax.tree.leaves((s1, m1)), jax.tree.leaves((s2, m2)), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def _computations(hlo: str) -> dict[str, str]:
  """HLO text split into its computations, by name."""
  out, name, lines = {}, None, []
  for line in hlo.splitlines():
    header = re.match(r'^(?:ENTRY )?%?([\w.\-]+) .*\{$', line)
    if header:
      name, lines = header.group(1), []
    elif line.startswith('}') and name:
      out[name] = '\n'.join(lines)
      name = None
    elif name:
      lines.append(line)
  return out


_CALLS = re.compile(
  r'(?:body|condition|to_apply|calls|branch_computations)=\{?([^,}\s]+(?:, ?%[\w.\-]+)*)'
)
_COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'collective-permute', 'all-to-all')


def _loop_computations(computations: dict[str, str]) -> set[str]:
  """Every computation run inside a while loop (bodies, conditions, and what they call)."""
  todo = [
    n.lstrip('%')
    for text in computations.values()
    for m in re.finditer(r'while\(.*?condition=%?([\w.\-]+), body=%?([\w.\-]+)', text)
    for n in m.groups()
  ]
  seen = set()
  while todo:
    name = todo.pop()
    if name in seen or name not in computations:
      continue
    seen.add(name)
    for match in _CALLS.finditer(computations[name]):
      todo.extend(n.strip().lstrip('%') for n in match.group(1).split(','))
  return seen


@pytest.mark.parametrize('name', sorted(BUILDERS))
def test_sharded_round_has_no_all_gather_and_no_collective_in_a_loop(name):
  process = BUILDERS[name](_mesh())
  batches = _batches()
  hlo = process.next.lower(process.initialize(), batches).compile().as_text()
  computations = _computations(hlo)
  loops = _loop_computations(computations)
  assert loops, 'expected the chunk and step loops in the compiled round'
  assert 'all-gather' not in hlo
  for loop in loops:
    for op in _COLLECTIVES:
      assert op not in computations[loop], f'{op} inside loop computation {loop}'
  assert 'all-reduce' in hlo  # the sums are combined across devices, once


def test_a_mesh_without_a_clients_axis_is_rejected():
  mesh = Mesh(np.array(jax.devices()[:8]), ('data',))
  with pytest.raises(ValueError, match="mesh must have an axis named 'clients'"):
    fl.algorithms.build_weighted_fed_avg(
      ref.linear_model(5, 3), fl.optimizers.build_sgdm(0.1), mesh=mesh
    )
  with pytest.raises(TypeError, match=r'mesh must be None or a jax\.sharding\.Mesh'):
    fl.algorithms.build_fed_eval(ref.linear_model(5, 3), mesh=jax.devices())


def test_per_client_outputs_come_back_in_cohort_order_when_sharded():
  model = ref.linear_model(5, 3)

  def client_loop(weights, hparams):
    def step(carry, batch, mask, key):
      return carry + jnp.sum(mask), None

    return fl.templates.ClientLoop(
      lambda client_input, key: client_input,
      step,
      lambda carry: fl.templates.ClientOutput(client_output=carry),
    )

  work = fl.templates.build_client_work(model, client_loop, evaluation=True, mesh=_mesh())
  batches = _batches()
  offsets = np.arange(13, dtype=np.float32) * 1000
  out = work.next(work.initialize(), model.initial_weights, batches, offsets)
  want = offsets + np.asarray(batches.mask).sum(axis=(1, 2))
  np.testing.assert_array_equal(out.result.client_outputs, want)
