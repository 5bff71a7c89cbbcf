"""From a random-access source of examples to numpy batches for pmap, with grain, and onto devices.

Training batches (`batches`) are a pure function of (source, seed, epoch, batch shape, process):

  order     = epoch_order(len(source), seed=seed, epoch=epoch)   (shuffle=False: arange)
  batch i   = source[order[i * B:(i + 1) * B]], B = the global batch over all processes and devices
  process p = rows [p * B / P, (p + 1) * B / P) of each global batch, reshaped [D, B / (P * D), ...]

so processes see disjoint parts of each global batch, whose union is what one process would see,
and a run resumed at batch k (`start_batch=k`) sees the batches an uninterrupted run sees from k on.
Threads read batches ahead (process p's rows only); `prefetch_to_device` then puts them on the
devices ahead of use. Images stay uint8 (4x fewer bytes to copy than float32): the consumer scales
them on the device (`image.astype(jnp.float32) / 255`).
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
from typing import Any, Iterable, Iterator, Sequence

import grain
import jax
import numpy as np

from iterseg.errors import SettingsError


def check_batch_size(batch_size: int, num_examples: int, processes: int | None = None,
                     devices: int | None = None) -> None:
  """SettingsError unless the global `batch_size` splits evenly over `processes` x `devices`
  (default: this JAX run's) and is at most `num_examples`: what training needs, checked early."""
  processes = jax.process_count() if processes is None else processes
  devices = jax.local_device_count() if devices is None else devices
  split = processes * devices
  most = num_examples // split * split  # The largest batch that splits and that the examples fill.
  where = f'{processes} process(es) x {devices} local device(s)'
  if not most:
    raise SettingsError(f'the {num_examples} training examples cannot give each of the {split} '
                        f'devices ({where}) an image: add training examples.')
  if batch_size < 1 or batch_size % split:
    near = sorted({min(max(split, batch_size // split * split + d), most) for d in (0, split)})
    raise SettingsError(f'config.train.batch_size={batch_size} does not split evenly over {where}: '
                        f'use a multiple of {split} (e.g. {" or ".join(map(str, near))}).')
  if batch_size > num_examples:
    raise SettingsError(f'config.train.batch_size={batch_size} is larger than the {num_examples} '
                        f'training examples: lower it to at most {most}.')


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Full global batches per epoch (the last partial one is dropped); at least 1."""
  if not 1 <= batch_size <= num_examples:
    check_batch_size(batch_size, num_examples, 1, 1)
  return num_examples // batch_size


def _shuffled(ds: grain.MapDataset, *, seed: int, epoch: int, shuffle: bool) -> grain.MapDataset:
  """`ds` in the epoch's order: grain's shuffle with a 32-bit seed derived from (seed, epoch)."""
  if not shuffle:
    return ds
  epoch_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint32)[0])
  return ds.shuffle(seed=epoch_seed)


def epoch_order(num_examples: int, *, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
  """int64 [num_examples]: the epoch's example order, a pure function of (seed, epoch)."""
  order = _shuffled(grain.MapDataset.range(num_examples), seed=seed, epoch=epoch, shuffle=shuffle)
  return np.fromiter((order[i] for i in range(num_examples)), np.int64, num_examples)


def _read(ds: grain.MapDataset, prefetch: int, num_workers: int | None) -> Iterator[Any]:
  """Iterates `ds`, read from now on by `num_workers` threads (default: up to 8) max(prefetch,
  num_workers) items ahead (prefetch 0: in the consumer's thread); closing it stops the threads."""
  if prefetch <= 0:
    options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  else:
    workers = num_workers or min(8, os.cpu_count() or 1)
    options = grain.ReadOptions(num_threads=workers, prefetch_buffer_size=max(prefetch, workers))
  iterator = iter(ds.to_iter_dataset(options))
  iterator.start_prefetch()
  return _closing(iterator)


def _closing(iterator: Iterator[Any]) -> Iterator[Any]:
  with contextlib.closing(iterator):
    yield from iterator


class Decoded:
  """`source` (random access) with its decoded examples kept in memory up to `max_bytes`, the first
  read ones first: a high-resolution image is decompressed once per run, not once per crop."""

  def __init__(self, source: Sequence[dict[str, Any]], max_bytes: int = 2 << 30):
    self.source, self.max_bytes, self.kept, self.bytes = source, max_bytes, {}, 0
    self.lock = threading.Lock()

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    with self.lock:
      if index in self.kept:
        return self.kept[index]
    example = self.source[index]
    size = sum(getattr(v, 'nbytes', 0) for v in example.values())
    with self.lock:
      if self.bytes + size <= self.max_bytes and index not in self.kept:
        self.kept[index] = example
        self.bytes += size
    return example


class Crops:
  """`source` with each example a random side x side crop (zero-padded where the image is smaller):
  the fixed-size examples training needs at native resolution. Half the crops (by a coin) centre on
  a random foreground pixel, so that sparse detail is seen (MONAI's RandCropByPosNegLabel, pos =
  neg = 1). Crop i is a pure function of (seed, epoch, i): a resumed run sees the same crops."""

  def __init__(self, source: Sequence[dict[str, Any]], side: int, *, seed: int, epoch: int):
    self.source, self.side, self.seed, self.epoch = source, side, seed, epoch

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    example, side = self.source[int(index)], self.side
    rng = np.random.default_rng([self.seed, self.epoch, int(index), 17])
    image, mask = example['image'], example['mask']
    h, w = mask.shape
    last_y, last_x = max(h - side, 0), max(w - side, 0)
    y, x = int(rng.integers(0, last_y + 1)), int(rng.integers(0, last_x + 1))
    if rng.random() < 0.5:  # Centred on foreground, where there is some.
      rows, cols = np.nonzero(mask[::4, ::4])
      if len(rows):
        pick = int(rng.integers(len(rows)))
        y = int(np.clip(rows[pick] * 4 - side // 2, 0, last_y))
        x = int(np.clip(cols[pick] * 4 - side // 2, 0, last_x))
    out = {'image': np.zeros((side, side, 3), np.uint8), 'mask': np.zeros((side, side), mask.dtype)}
    rows, cols = min(side, h - y), min(side, w - x)
    out['image'][:rows, :cols] = image[y:y + rows, x:x + cols]
    out['mask'][:rows, :cols] = mask[y:y + rows, x:x + cols]
    return out


def batches(source: Sequence[dict[str, Any]], *, batch_size: int, seed: int, epoch: int,
            start_batch: int = 0, shuffle: bool = True, num_local_devices: int | None = None,
            process_index: int | None = None, process_count: int | None = None,
            drop_remainder: bool = True, prefetch: int = 2, num_workers: int | None = None,
            crop: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Yields this process's share of each global batch of one epoch, from batch `start_batch` on:
  {'image': uint8 [D, b, H, W, 3], 'mask': uint8 [D, b, H, W]}, D = num_local_devices (default
  jax.local_device_count()), b = batch_size // (process_count * D): batch_size is the GLOBAL batch.
  With `crop` (native resolution), each example is first a random crop of that side (`Crops`).
  There are len(source) // batch_size batches, or with drop_remainder=False ceil(len(source) /
  batch_size), the last completed with the first examples of the epoch's order. Reading starts at
  this call, by grain threads (`_read`; zlib runs outside the GIL); closing the generator stops it.
  """
  devices = jax.local_device_count() if num_local_devices is None else num_local_devices
  processes = jax.process_count() if process_count is None else process_count
  process = jax.process_index() if process_index is None else process_index
  if not 0 <= process < processes:
    raise ValueError(f'process_index {process} not in [0, {processes})')
  check_batch_size(batch_size, len(source), processes, devices)
  num_batches = steps_per_epoch(len(source), batch_size)
  if not drop_remainder and len(source) % batch_size:
    num_batches += 1
  if not 0 <= start_batch <= num_batches:
    raise ValueError(f'start_batch {start_batch} not in [0, {num_batches}] (batches this epoch)')

  if crop:
    source = Crops(source, crop, seed=seed, epoch=epoch)
  ds = _shuffled(grain.MapDataset.source(source), seed=seed, epoch=epoch, shuffle=shuffle)
  padding = num_batches * batch_size - len(source)
  if padding > 0:  # Complete the last batch with the first examples of the epoch's order.
    ds = grain.MapDataset.concatenate([ds, ds[:padding]])
  else:
    ds = ds[:num_batches * batch_size]
  # B / P rows each: global batch i is batches [i * P, (i + 1) * P), and process p keeps the p-th.
  ds = ds.batch(batch_size // processes, drop_remainder=True, batch_fn=_stack)
  ds = ds[process::processes][start_batch:]
  ds = ds.map(lambda batch: {k: v.reshape(devices, -1, *v.shape[1:]) for k, v in batch.items()})
  return _read(ds, prefetch, num_workers)


def _stack(examples: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
  return {key: np.stack([e[key] for e in examples]) for key in ('image', 'mask')}


def _stack_eval(examples: Sequence[dict[str, Any] | None]) -> dict[str, np.ndarray] | None:
  examples = [e for e in examples if e is not None]  # None: an example that could not be read.
  if not examples:
    return None  # grain drops it.
  return dict(_stack(examples),
              original_size=np.stack([np.asarray(e['original_size'], np.int32) for e in examples]),
              name=np.array([str(e['name']) for e in examples]))


def eval_batches(source: Sequence[dict[str, Any]], batch_size: int, *, prefetch: int = 2,
                 num_workers: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """All examples in source order, no shuffling, last partial batch kept, no device axis (one host).
  Each item: {'image': uint8 [b, H, W, 3], 'mask': uint8 [b, H, W], 'original_size': int32 [b, 2]
  (height, width), 'name': str array [b]}, b <= batch_size (less the examples that are None: a
  source's way to say one could not be read); read ahead as in `batches`."""
  if batch_size < 1:
    raise ValueError(f'batch_size must be positive, got {batch_size}')
  ds = grain.MapDataset.source(source).batch(batch_size, drop_remainder=False, batch_fn=_stack_eval)
  return _read(ds, prefetch, num_workers)


def pad_batch(array: np.ndarray, size: int) -> np.ndarray:
  """[size, ...]: a last batch [b <= size, ...] padded with its last row to the compiled shape (drop
  rows b: afterwards)."""
  if len(array) == size:
    return array
  return np.concatenate([array, np.repeat(array[-1:], size - len(array), axis=0)])


def prefetch_to_device(iterator: Iterable[Any], size: int = 2,
                       devices: Sequence[jax.Device] | None = None) -> Iterator[Any]:
  """Yields the items of `iterator` (pytrees of numpy arrays [D, ...], D = len(devices)) as
  jax.Arrays split over axis 0 onto `devices` (default jax.local_devices()), `size` items ahead
  (device_put is asynchronous: copies overlap the step). Sharded as pmap shards in_axes=0 arguments,
  so pmap uses them in place, also with several processes. Closing it closes `iterator`."""
  if size < 1:
    raise ValueError(f'size must be at least 1, got {size}')
  devices = list(jax.local_devices() if devices is None else devices)
  mesh = jax.sharding.Mesh(np.array(devices), ('devices',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('devices'))
  iterator = iter(iterator)
  in_flight = collections.deque()
  try:
    for item in iterator:
      in_flight.append(jax.device_put(item, sharding))
      if len(in_flight) == size:
        yield in_flight.popleft()
    while in_flight:
      yield in_flight.popleft()
  finally:
    if hasattr(iterator, 'close'):
      iterator.close()
