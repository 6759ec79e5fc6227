"""A TFF release manager that writes each round's scalar metrics as TensorBoard events.

The events are the ones `tf.summary.scalar` writes (a float32 tensor with the `scalars` plugin's
metadata), written by TensorBoard's own pure-Python `EventFileWriter` and flushed after every
release, so an interrupted run keeps its last rounds. Not through TensorFlow: in TF 2.14 every
eager `tf.summary.scalar` call leaves ~0.3-0.6 KB in the process for good (several KB per round
at a dozen metrics; benchmarks/memory_growth.py), which a 1,000-round run must not accumulate.
"""

from __future__ import annotations

import numbers
import os
import time
from typing import Any

import numpy as np
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.plugins.scalar import metadata as scalar_metadata
from tensorboard.summary.writer import event_file_writer
from tensorboard.util import tensor_util
import tensorflow_federated as tff


class TensorBoardReleaseManager(tff.program.ReleaseManager):
  """Releases a flat mapping of metric name to number as one TensorBoard step per key.

  Values that are not real numbers (strings, None) are skipped, as TFF's own TensorBoard
  release manager skips them.

  Args:
    summary_dir: the directory of the event file (created if missing).
  """

  def __init__(self, summary_dir: str):
    os.makedirs(summary_dir, exist_ok=True)
    self._writer = event_file_writer.EventFileWriter(summary_dir)
    self._metadata = scalar_metadata.create_summary_metadata(display_name='', description='')

  async def release(self, value: dict[str, Any], key: int) -> None:
    """Writes every numeric entry of `value` at step `key` and flushes.

    Args:
      value: metric name to value.
      key: the step (the round).
    """
    summary = summary_pb2.Summary(
      value=[
        summary_pb2.Summary.Value(
          tag=name,
          tensor=tensor_util.make_tensor_proto(np.float32(number)),
          metadata=self._metadata,
        )
        for name, number in value.items()
        if isinstance(number, (numbers.Real, np.number)) and not isinstance(number, bool)
      ]
    )
    self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(key), summary=summary))
    self._writer.flush()

  def close(self) -> None:
    """Closes the event file, so a sweep does not accumulate open writers and threads."""
    self._writer.close()
