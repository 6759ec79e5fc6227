"""Tests of the atomic output writers."""

import os
import stat

import tensorflow as tf

from tff_clipq.experiments import outputs


class AtomicWriteTest(tf.test.TestCase):
  def test_write_leaves_only_the_target_readable_by_others(self):
    directory = os.path.join(self.get_temp_dir(), 'results')
    path = os.path.join(directory, 'report.md')
    outputs.write_text(path, 'first')
    outputs.write_text(path, 'second')
    with open(path) as f:
      self.assertEqual(f.read(), 'second')
    self.assertEqual(os.listdir(directory), ['report.md'])
    self.assertTrue(os.stat(path).st_mode & stat.S_IROTH)

  def test_failed_write_keeps_the_previous_file(self):
    path = os.path.join(self.get_temp_dir(), 'summary.json')
    outputs.write_json(path, {'round': 1})
    with self.assertRaises(RuntimeError):
      with outputs.atomic_file(path) as file:
        file.write('{"round": 2')
        raise RuntimeError('killed mid-write')
    self.assertEqual(outputs.read_json(path), {'round': 1})
    self.assertEqual(os.listdir(os.path.dirname(path)), ['summary.json'])


if __name__ == '__main__':
  tf.test.main()
