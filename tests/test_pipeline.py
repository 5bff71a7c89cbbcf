"""The input pipeline: batch shapes, determinism given (seed, epoch), exact resume, process sharding."""

import threading
import time

import numpy as np
import pytest

from iterseg.data import pipeline

N, SIZE = 50, 4


def make_source(n=N):
  """Example i has every image pixel = i and mask = i % 2, so batches can be traced back to indices."""
  return [{'image': np.full((SIZE, SIZE, 3), i, np.uint8), 'mask': np.full((SIZE, SIZE), i % 2, np.uint8),
           'original_size': np.array([10 + i, 20], np.int32), 'name': f'case/{i}'} for i in range(n)]


def indices(batch):
  """[D * b] example indices of a batch, device-major."""
  return np.rint(batch['image'][..., 0, 0, 0] * 255).astype(int).reshape(-1).tolist()


def run(source=None, **kwargs):
  kwargs = dict(dict(batch_size=8, seed=0, epoch=0, num_local_devices=2, process_index=0,
                     process_count=1), **kwargs)
  return list(pipeline.batches(make_source() if source is None else source, **kwargs))


def test_batch_shapes_and_dtypes():
  batches = run(batch_size=8, num_local_devices=2)
  assert len(batches) == N // 8 == pipeline.steps_per_epoch(N, 8)
  for batch in batches:
    assert batch['image'].shape == (2, 4, SIZE, SIZE, 3) and batch['image'].dtype == np.float32
    assert batch['mask'].shape == (2, 4, SIZE, SIZE) and batch['mask'].dtype == np.uint8
    assert 0.0 <= batch['image'].min() and batch['image'].max() <= 1.0
    np.testing.assert_array_equal(batch['mask'][..., 0, 0].reshape(-1), np.array(indices(batch)) % 2)


def test_default_device_count_is_local_devices():
  import jax  # pylint: disable=g-import-not-at-top
  batch = next(pipeline.batches(make_source(), batch_size=4 * jax.local_device_count(), seed=0, epoch=0))
  assert batch['image'].shape[:2] == (jax.local_device_count(), 4)


def test_epoch_is_a_permutation_determined_by_seed_and_epoch():
  first = [indices(b) for b in run(seed=1, epoch=3)]
  assert [indices(b) for b in run(seed=1, epoch=3)] == first
  seen = sum(first, [])
  assert len(set(seen)) == len(seen) == (N // 8) * 8  # No repeats within an epoch.
  assert [indices(b) for b in run(seed=1, epoch=4)] != first
  assert [indices(b) for b in run(seed=2, epoch=3)] != first
  in_order = sum((indices(b) for b in run(shuffle=False)), [])
  assert in_order == list(range((N // 8) * 8))


def test_keeping_the_remainder_covers_every_example():
  batches = run(drop_remainder=False)
  assert len(batches) == 7  # ceil(50 / 8), the last padded from the start of the epoch's order.
  assert set(sum((indices(b) for b in batches), [])) == set(range(N))
  assert all(b['image'].shape == (2, 4, SIZE, SIZE, 3) for b in batches)


def test_start_batch_resumes_exactly():
  full = [indices(b) for b in run(seed=5, epoch=2)]
  resumed = [indices(b) for b in run(seed=5, epoch=2, start_batch=4)]
  assert resumed == full[4:]
  assert run(start_batch=len(full)) == []
  with pytest.raises(ValueError, match='start_batch'):
    run(start_batch=len(full) + 1)


def test_two_processes_see_disjoint_halves_of_each_global_batch():
  single = [indices(b) for b in run(batch_size=16, num_local_devices=2, process_count=1)]
  halves = [[indices(b) for b in run(batch_size=16, num_local_devices=2, process_index=p,
                                     process_count=2)] for p in (0, 1)]
  assert len(halves[0]) == len(halves[1]) == len(single)
  for whole, first, second in zip(single, *halves):
    assert len(first) == len(second) == 8  # [2 devices, 4] each.
    assert not set(first) & set(second)
    assert first + second == whole


def test_indivisible_batch_is_a_clear_error():
  with pytest.raises(ValueError, match='not divisible by 2 process.*3 local device'):
    run(batch_size=8, num_local_devices=3, process_count=2)
  with pytest.raises(ValueError, match='larger than the 50 training examples'):
    run(batch_size=64, num_local_devices=1)
  with pytest.raises(ValueError, match='larger than'):
    pipeline.steps_per_epoch(10, 11)
  assert pipeline.steps_per_epoch(10, 10) == 1
  assert pipeline.steps_per_epoch(200, 64) == 3


def test_eval_batches_in_order_with_partial_last_batch():
  batches = list(pipeline.eval_batches(make_source(10), 4))
  assert [b['image'].shape for b in batches] == [(4, SIZE, SIZE, 3), (4, SIZE, SIZE, 3), (2, SIZE, SIZE, 3)]
  assert sum((np.rint(b['image'][:, 0, 0, 0] * 255).astype(int).tolist() for b in batches), []) \
      == list(range(10))
  assert batches[-1]['name'].tolist() == ['case/8', 'case/9']
  assert batches[-1]['original_size'].dtype == np.int32
  np.testing.assert_array_equal(batches[0]['original_size'][:, 0], [10, 11, 12, 13])
  assert batches[0]['mask'].shape == (4, SIZE, SIZE)


class _Failing(list):

  def __getitem__(self, i):
    if i == 13:
      raise OSError('disk on fire')
    return super().__getitem__(i)


def test_background_errors_reach_the_consumer():
  with pytest.raises(OSError, match='disk on fire'):
    run(source=_Failing(make_source()), shuffle=False)


def test_prefetch_runs_ahead_and_stops_when_closed():
  threads_before = threading.active_count()
  it = pipeline.batches(make_source(), batch_size=2, seed=0, epoch=0, num_local_devices=1,
                        process_count=1, process_index=0, prefetch=3)
  next(it)
  it.close()
  deadline = time.time() + 5
  while threading.active_count() > threads_before and time.time() < deadline:
    time.sleep(0.05)
  assert threading.active_count() <= threads_before
  unprefetched = run(prefetch=0)
  assert [indices(b) for b in unprefetched] == [indices(b) for b in run()]
