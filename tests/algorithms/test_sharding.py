"""Device-local sharding (8 forced CPU devices): each device runs its own clients, the sums are
combined once per round, and the result equals the single-device round. Padding is invisible:
the empty clients that fill a device or a process block change nothing, for streaming,
stacked (median, trimmed mean, Krum) and unweighted aggregators alike."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest
from jax.sharding import Mesh

import fedjax_lite as fl

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason='needs 8 devices (conftest.py)')

# 13 clients: does not divide by 8, so the cohort is padded with empty clients (one real client
# has no example). On one device the default CPU chunk (7 lanes, 2 chunks) does not divide it
# either: its last chunk has a filler lane.
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


# The aggregators that count clients (unweighted ones divide by the clients; stacked ones rank
# every client): padding must be neither counted nor ranked.
def _unweighted_fed_avg(factory):
  return lambda mesh: fl.algorithms.build_unweighted_fed_avg(
    ref.linear_model(5, 3), fl.optimizers.build_sgdm(0.1), model_aggregator=factory(), mesh=mesh
  )


BUILDERS |= {
  # the command's fedavg_unweighted
  'unweighted_mean': _unweighted_fed_avg(fl.aggregators.UnweightedMeanFactory),
  'robust_unweighted': _unweighted_fed_avg(
    lambda: fl.aggregators.robust_aggregator(weighted=False)
  ),
}
# Aggregators that need every client at once: the updates are stacked (gathered), not summed.
STACKED_BUILDERS = {
  'median': _unweighted_fed_avg(fl.aggregators.median_factory),
  'trimmed_mean': _unweighted_fed_avg(lambda: fl.aggregators.trimmed_mean_factory(0.2)),
  'krum': _unweighted_fed_avg(lambda: fl.aggregators.krum_factory(2, num_selected=3)),
  'clipped_median': _unweighted_fed_avg(
    lambda: fl.aggregators.clipping_factory(
      fl.aggregators.PrivateQuantileEstimationProcess.no_noise(0.05, 0.5, 0.5),
      fl.aggregators.median_factory(),
    )
  ),
}


def _batches():
  return fl.data.build_client_batches(
    ref.random_clients(SIZES), batch_size=4, num_epochs=2, client_keys=range(100, 113)
  )


def _padded_in_blocks(batches, block=3):
  """The cohort padded as a multi-process run pads it (`fl.simulation`'s `pad_block`): with
  clients without data (mask 0, id 0) appended up to a multiple of `block` (13 -> 15 clients).
  15 does not divide by 8 devices either, so `mesh=` pads it once more (to 16)."""
  extra = -batches.mask.shape[0] % block
  return jax.tree.map(
    lambda x: np.concatenate([x, np.zeros((extra, *x.shape[1:]), x.dtype)]), batches
  )


def _two_rounds(process, batches):
  state = process.initialize()
  for _ in range(2):
    state, metrics = process.next(state, batches)
  return jax.tree.leaves((state, metrics))


@pytest.mark.parametrize('name', sorted(BUILDERS | STACKED_BUILDERS))
def test_sharded_round_equals_single_device(name):
  """Padding is invisible: 13 clients on one device (chunks of 7: one filler lane) equal the
  same clients padded in process blocks and by the mesh, on 8 devices."""
  build = (BUILDERS | STACKED_BUILDERS)[name]
  single = _two_rounds(build(None), _batches())
  sharded = _two_rounds(build(_mesh()), _padded_in_blocks(_batches()))
  for a, b in zip(single, sharded, strict=True):
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
