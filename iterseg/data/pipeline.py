"""From a random-access source of examples to numpy batches for pmap.

Training batches (`batches`) are a pure function of (source, seed, epoch, batch shape, process):

  order     = np.random.default_rng([seed, epoch]).permutation(len(source))   (or arange: shuffle=False)
  batch i   = source[order[i * B:(i + 1) * B]], B = the global batch over all processes and devices
  process p = rows [p * B / P, (p + 1) * B / P) of each global batch, reshaped [D, B / (P * D), ...]

so two processes see disjoint halves of each global batch, whose union is what one process would see, and
a run resumed at batch k (`start_batch=k`) sees exactly the batches an uninterrupted run sees from k on.
Batches are assembled in a background thread (`prefetch` ahead) so reading overlaps the training step.
"""

from __future__ import annotations

import concurrent.futures
import os
import queue
import threading
from typing import Any, Iterable, Iterator, Sequence

import jax
import numpy as np


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Full global batches per epoch (the last partial one is dropped); at least 1."""
  if batch_size < 1:
    raise ValueError(f'batch_size must be positive, got {batch_size}')
  if batch_size > num_examples:
    raise ValueError(f'batch_size {batch_size} is larger than the {num_examples} training examples: '
                     f'lower config.train.batch_size to at most {num_examples}')
  return num_examples // batch_size


def epoch_order(num_examples: int, *, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
  """int64 [num_examples]: the epoch's example order, a pure function of (seed, epoch)."""
  if not shuffle:
    return np.arange(num_examples)
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def batches(source: Sequence[dict[str, Any]], *, batch_size: int, seed: int, epoch: int,
            start_batch: int = 0, shuffle: bool = True, num_local_devices: int | None = None,
            process_index: int | None = None, process_count: int | None = None,
            drop_remainder: bool = True, prefetch: int = 2,
            num_workers: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Yields this process's share of each global batch of one epoch, from batch `start_batch` on.

  Each item: {'image': float32 [D, b, H, W, 3] in [0, 1], 'mask': uint8 [D, b, H, W]}, where
  D = num_local_devices (default jax.local_device_count()) and b = batch_size // (process_count * D).
  batch_size is the GLOBAL batch. There are len(source) // batch_size batches when drop_remainder; else
  ceil(len(source) / batch_size), the last completed with the first examples of the epoch's order so that
  every batch has the same shape. Examples are decoded by `num_workers` threads (default: up to 8; the
  zlib decompression that dominates runs outside the GIL).
  """
  devices = jax.local_device_count() if num_local_devices is None else num_local_devices
  processes = jax.process_count() if process_count is None else process_count
  process = jax.process_index() if process_index is None else process_index
  if not 0 <= process < processes:
    raise ValueError(f'process_index {process} not in [0, {processes})')
  if batch_size % (processes * devices):
    raise ValueError(f'global batch_size {batch_size} is not divisible by {processes} process(es) x '
                     f'{devices} local device(s); use a multiple of {processes * devices}')
  per_device = batch_size // (processes * devices)
  num_batches = steps_per_epoch(len(source), batch_size)
  order = epoch_order(len(source), seed=seed, epoch=epoch, shuffle=shuffle)
  if not drop_remainder and len(source) % batch_size:
    num_batches += 1
    order = np.concatenate([order, order[:num_batches * batch_size - len(source)]])
  if not 0 <= start_batch <= num_batches:
    raise ValueError(f'start_batch {start_batch} not in [0, {num_batches}] (batches in this epoch)')

  def local_indices(i: int) -> np.ndarray:
    global_batch = order[i * batch_size:(i + 1) * batch_size]
    share = batch_size // processes
    return global_batch[process * share:(process + 1) * share]

  def assemble(examples: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    image = np.stack([e['image'] for e in examples])
    mask = np.stack([e['mask'] for e in examples])
    return {
        'image': (image.astype(np.float32) / 255.0).reshape(devices, per_device, *image.shape[1:]),
        'mask': mask.reshape(devices, per_device, *mask.shape[1:]),
    }

  def produce() -> Iterator[dict[str, np.ndarray]]:
    workers = num_workers or min(8, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix='iterseg-read') as pool:
      for i in range(start_batch, num_batches):
        yield assemble(read(source, local_indices(i), pool))

  return prefetch_in_background(produce(), prefetch)


def eval_batches(source: Sequence[dict[str, Any]], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """All examples in source order, no shuffling, last partial batch kept, no device axis (one host).

  Each item: {'image': float32 [b, H, W, 3] in [0, 1], 'mask': uint8 [b, H, W],
  'original_size': int32 [b, 2] (height, width), 'name': str array [b]}, b <= batch_size.
  """
  if batch_size < 1:
    raise ValueError(f'batch_size must be positive, got {batch_size}')
  for start in range(0, len(source), batch_size):
    examples = read(source, np.arange(start, min(start + batch_size, len(source))))
    yield {
        'image': np.stack([e['image'] for e in examples]).astype(np.float32) / 255.0,
        'mask': np.stack([e['mask'] for e in examples]),
        'original_size': np.stack([np.asarray(e['original_size'], np.int32) for e in examples]),
        'name': np.array([e['name'] for e in examples]),
    }


def read(source: Sequence[dict[str, Any]], indices: Iterable[int],
         pool: concurrent.futures.Executor | None = None) -> list[dict[str, Any]]:
  """[source[i] for i in indices], decoded by `pool`'s threads when given."""
  indices = [int(i) for i in indices]
  if pool is None:
    return [source[i] for i in indices]
  return list(pool.map(source.__getitem__, indices))


def prefetch_in_background(iterator: Iterator[Any], size: int) -> Iterator[Any]:
  """Runs `iterator` in a daemon thread, up to `size` items ahead; re-raises its errors here.

  Closing the returned generator (or dropping it) stops the thread at its next item.
  """
  if size <= 0:
    return iterator
  return _prefetched(iterator, size)


_DONE = object()


class _Failed:

  def __init__(self, error: BaseException):
    self.error = error


def _prefetched(iterator: Iterator[Any], size: int) -> Iterator[Any]:
  items: queue.Queue = queue.Queue(maxsize=size)
  stop = threading.Event()

  def put(item) -> bool:
    while not stop.is_set():
      try:
        items.put(item, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  def produce():
    try:
      for item in iterator:
        if not put(item):
          return
      put(_DONE)
    except BaseException as e:  # pylint: disable=broad-except  # Handed to the consumer.
      put(_Failed(e))
    finally:
      if hasattr(iterator, 'close'):
        iterator.close()  # Runs the iterator's own clean-up (e.g. its thread pool) in this thread.

  thread = threading.Thread(target=produce, name='iterseg-prefetch', daemon=True)
  thread.start()
  try:
    while True:
      item = items.get()
      if item is _DONE:
        return
      if isinstance(item, _Failed):
        raise item.error
      yield item
  finally:
    stop.set()
