"""The README's example runs as a user runs it: piped through `tail`, it ends and prints rounds."""

import os
import shlex
import subprocess
import sys

import pytest
import tensorflow as tf

_EXAMPLE = os.path.join(
  os.path.dirname(__file__), os.pardir, os.pardir, 'examples', 'fedavg_with_clipq.py'
)


@pytest.mark.slow
class FedAvgWithClipqExampleTest(tf.test.TestCase):
  def test_example_finishes_through_a_pipe(self):
    # A worker_binary left holding the pipe would keep `tail` waiting until the timeout.
    command = f'{shlex.quote(sys.executable)} {shlex.quote(_EXAMPLE)} --rounds=2 | tail -n 2'
    result = subprocess.run(
      ['bash', '-c', command], capture_output=True, text=True, timeout=600, check=False
    )
    self.assertEqual(result.returncode, 0, msg=result.stderr[-3000:])
    lines = result.stdout.strip().splitlines()
    self.assertLen(lines, 2)
    self.assertTrue(lines[1].startswith('round 2: train accuracy'), msg=result.stdout)
    self.assertIn('bits per client', lines[1])


if __name__ == '__main__':
  tf.test.main()
