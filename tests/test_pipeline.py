"""The input pipeline: batch shapes, determinism given (seed, epoch), exact resume, process sharding,
and prefetching onto the (4 fake CPU) devices."""

import threading
import time

import jax
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
  return np.asarray(batch['image'])[..., 0, 0, 0].astype(int).reshape(-1).tolist()


def run(source=None, **kwargs):
  kwargs = dict(dict(batch_size=8, seed=0, epoch=0, num_local_devices=2, process_index=0,
                     process_count=1), **kwargs)
  return list(pipeline.batches(make_source() if source is None else source, **kwargs))


def test_batch_shapes_and_dtypes():
  batches = run(batch_size=8, num_local_devices=2)
  assert len(batches) == N // 8 == pipeline.steps_per_epoch(N, 8)
  for batch in batches:
    assert batch['image'].shape == (2, 4, SIZE, SIZE, 3) and batch['image'].dtype == np.uint8
    assert batch['mask'].shape == (2, 4, SIZE, SIZE) and batch['mask'].dtype == np.uint8
    assert sorted(batch) == ['image', 'mask']
    np.testing.assert_array_equal(batch['mask'][..., 0, 0].reshape(-1), np.array(indices(batch)) % 2)


def test_default_device_count_is_local_devices():
  batch = next(pipeline.batches(make_source(), batch_size=4 * jax.local_device_count(), seed=0, epoch=0))
  assert batch['image'].shape[:2] == (jax.local_device_count(), 4)


def test_epoch_is_a_permutation_determined_by_seed_and_epoch():
  first = [indices(b) for b in run(seed=1, epoch=3)]
  assert [indices(b) for b in run(seed=1, epoch=3)] == first
  seen = sum(first, [])
  assert len(set(seen)) == len(seen) == (N // 8) * 8  # No repeats within an epoch.
  assert [indices(b) for b in run(seed=1, epoch=4)] != first
  assert [indices(b) for b in run(seed=2, epoch=3)] != first
  assert seen == pipeline.epoch_order(N, seed=1, epoch=3)[:len(seen)].tolist()
  in_order = sum((indices(b) for b in run(shuffle=False)), [])
  assert in_order == list(range((N // 8) * 8)) == pipeline.epoch_order(N, seed=1, epoch=3,
                                                                       shuffle=False)[:48].tolist()


def test_keeping_the_remainder_covers_every_example():
  batches = run(drop_remainder=False, seed=4)
  assert len(batches) == 7  # ceil(50 / 8), the last padded from the start of the epoch's order.
  order = pipeline.epoch_order(N, seed=4, epoch=0).tolist()
  assert sum((indices(b) for b in batches), []) == order + order[:6]
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
  with pytest.raises(ValueError, match=r'batch_size=8 does not split evenly over 2 process\(es\) x '
                     r'3 local device\(s\): use a multiple of 6 \(e.g. 6 or 12\)'):
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
  assert all(b['image'].dtype == np.uint8 for b in batches)
  assert sum((b['image'][:, 0, 0, 0].astype(int).tolist() for b in batches), []) == list(range(10))
  assert batches[-1]['name'].tolist() == ['case/8', 'case/9']
  assert batches[-1]['original_size'].dtype == np.int32
  np.testing.assert_array_equal(batches[0]['original_size'][:, 0], [10, 11, 12, 13])
  assert batches[0]['mask'].shape == (4, SIZE, SIZE)
  assert [b['name'].tolist() for b in pipeline.eval_batches(make_source(3), 4, prefetch=0)] == \
      [['case/0', 'case/1', 'case/2']]
  assert list(pipeline.eval_batches([], 4)) == []
  with pytest.raises(ValueError, match='batch_size must be positive'):
    pipeline.eval_batches(make_source(3), 0)


class _Failing(list):

  def __getitem__(self, i):
    if i == 13:
      raise OSError('disk on fire')
    return super().__getitem__(i)


def test_background_errors_reach_the_consumer():
  with pytest.raises(OSError, match='disk on fire'):
    run(source=_Failing(make_source()), shuffle=False)


class _Logged(list):

  def __init__(self, items):
    super().__init__(items)
    self.read = []

  def __getitem__(self, i):
    self.read.append(i)
    return super().__getitem__(i)


def test_prefetch_runs_ahead_and_stops_when_closed():
  threads_before = threading.active_count()
  source = _Logged(make_source())
  it = pipeline.batches(source, batch_size=2, seed=0, epoch=0, num_local_devices=1, process_count=1,
                        process_index=0, prefetch=3, num_workers=2)
  deadline = time.time() + 5
  while len(source.read) < 3 * 2 and time.time() < deadline:  # Reading starts before the first next().
    time.sleep(0.01)
  time.sleep(0.1)
  assert len(source.read) == 3 * 2  # max(prefetch, num_workers) = 3 batches ahead, no more.
  next(it)
  it.close()
  deadline = time.time() + 5
  while threading.active_count() > threads_before and time.time() < deadline:
    time.sleep(0.05)
  assert threading.active_count() <= threads_before
  unprefetched = run(prefetch=0)
  assert [indices(b) for b in unprefetched] == [indices(b) for b in run()]
  assert [indices(b) for b in run(num_workers=1)] == [indices(b) for b in run(num_workers=4, prefetch=1)]


class _Counting:
  """An iterator over `items` that counts the items taken and whether it was closed."""

  def __init__(self, items):
    self.items, self.taken, self.closed = iter(items), 0, False

  def __iter__(self):
    return self

  def __next__(self):
    item = next(self.items)
    self.taken += 1
    return item

  def close(self):
    self.closed = True


def test_prefetch_to_device_puts_batches_on_the_devices_ahead_of_use():
  devices = jax.local_devices()
  assert len(devices) == 4
  host = run(batch_size=8, num_local_devices=4, seed=3)
  source = _Counting(host)
  on_device = pipeline.prefetch_to_device(source, size=2)
  first = next(on_device)
  assert source.taken == 2  # This batch and the next are on the devices already.
  rest = list(on_device)
  assert source.taken == len(host) == 1 + len(rest)
  assert source.closed
  p_sum = jax.pmap(lambda x: x.astype(np.int32).sum(), axis_name='b')
  for x, y in zip(host, [first] + rest):
    assert isinstance(y['image'], jax.Array) and y['image'].dtype == np.uint8
    assert y['image'].sharding.device_set == set(devices)
    for k in ('image', 'mask'):
      np.testing.assert_array_equal(np.asarray(y[k]), x[k])
      assert [s.device for s in y[k].addressable_shards] == devices  # Slice i of axis 0 on device i.
      np.testing.assert_array_equal(np.asarray(y[k].addressable_shards[1].data), x[k][1:2])
      # pmap takes the array as it lies (its own in_axes=0 sharding) and computes the same.
      assert y[k].sharding.is_equivalent_to(jax.pmap(lambda a: a)(x[k]).sharding, x[k].ndim)
      np.testing.assert_array_equal(p_sum(y[k]), p_sum(x[k]))


def test_prefetch_to_device_closes_its_source_and_checks_size():
  source = _Counting(run(batch_size=8, num_local_devices=4))
  on_device = pipeline.prefetch_to_device(source, size=3)
  next(on_device)
  assert source.taken == 3
  on_device.close()
  assert source.closed
  with pytest.raises(ValueError, match='size'):
    next(pipeline.prefetch_to_device(iter([]), size=0))
  assert list(pipeline.prefetch_to_device(iter([]))) == []
