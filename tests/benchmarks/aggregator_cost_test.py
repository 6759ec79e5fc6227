"""Smoke test of `benchmarks/aggregator_cost.py`: a tiny run writes a consistent report."""

import json
import os

import benchmark_loader
import pytest
import tensorflow as tf


class AggregatorCostBenchmarkTest(tf.test.TestCase):
  def _run(self, *flags: str) -> tuple[int, str]:
    log_path = os.path.join(self.get_temp_dir(), 'aggregator_cost.log')
    return benchmark_loader.run('aggregator_cost', flags, log_path, timeout=300)

  @pytest.mark.slow
  def test_tiny_run_writes_markdown_and_json(self):
    output = os.path.join(self.get_temp_dir(), 'aggregator_cost.md')
    returncode, log = self._run(
      '--clients=20:10', '--repeats=5', '--tff_clients=4', '--tff_rounds=1', f'--output={output}'
    )
    self.assertEqual(returncode, 0, msg=log[-3000:])
    with open(os.path.splitext(output)[0] + '.json') as f:
      report = json.load(f)
    pieces = report['pieces_ms']
    for bits in (2, 4):
      # The MSE-optimal threshold search costs more than max|x|; both cost more than nothing.
      self.assertGreater(
        pieces[f'clipq_{bits}b_octav_encode'], pieces[f'clipq_{bits}b_max_abs_encode']
      )
      self.assertGreater(pieces[f'clipq_{bits}b_max_abs_encode'], 0.0)
      overhead = report['overheads'][f'clipq_{bits}b @ 20:10']
      self.assertGreater(overhead['ratio'], 1.0)
      self.assertAlmostEqual(
        overhead['ratio'], 1.0 + overhead['added_ms'] / overhead['fedavg_client_ms']
      )
    self.assertGreater(report['local_training_ms']['20:10'], 0.0)
    self.assertEqual([t['intra_op_threads'] for t in report['tff']], [0, 1])
    for in_tff in report['tff']:
      self.assertEqual(in_tff['clients'], 4)
      expected = {'mean_factory'}
      for bits in (2, 4):
        expected |= {f'clipq_{bits}b_octav', f'clipq_{bits}b_max_abs', f'tff_encoded_{bits}b'}
      self.assertEqual(set(in_tff['cpu_ms_per_client']), expected)
      for name, added in in_tff['added_ms_per_client'].items():
        self.assertAlmostEqual(
          added, in_tff['cpu_ms_per_client'][name] - in_tff['cpu_ms_per_client']['mean_factory']
        )
    with open(output) as f:
      text = f.read()
    self.assertIn('| clipq_2b @ 20:10 |', text)
    self.assertIn('| clipq_2b_octav |', text)
    self.assertIn('worker with 1 thread(s) per TensorFlow operation', text)

  def test_bad_client_size_names_the_flag(self):
    returncode, log = self._run('--clients=20', '--repeats=5')
    self.assertNotEqual(returncode, 0)
    self.assertIn('--clients', log)
    returncode, log = self._run('--tff_intra_op_threads=1,-2', '--repeats=5')
    self.assertNotEqual(returncode, 0)
    self.assertIn('--tff_intra_op_threads', log)


if __name__ == '__main__':
  tf.test.main()
