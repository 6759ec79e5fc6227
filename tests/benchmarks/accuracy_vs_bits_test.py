"""Smoke test of `benchmarks/accuracy_vs_bits.py`: a tiny study aggregates seeds and checks goals."""

import json
import os

import benchmark_loader
import pytest
import tensorflow as tf


@pytest.mark.slow
class AccuracyVsBitsBenchmarkTest(tf.test.TestCase):
  def test_tiny_study_writes_mean_and_std_over_seeds(self):
    directory = self.get_temp_dir()
    results = os.path.join(directory, 'accuracy')
    returncode, log = benchmark_loader.run(
      'accuracy_vs_bits',
      [
        '--methods=main',
        '--datasets=synthetic',
        '--partitions=iid',
        '--payloads=update',
        '--seeds=0,1',
        '--rounds=1',
        '--num_clients=10',
        f'--output_dir={directory}/runs',
        f'--results={results}',
      ],
      os.path.join(directory, 'log.txt'),
      timeout=900,
    )
    self.assertEqual(returncode, 0, msg=log[-3000:])
    with open(results + '_main.json') as f:
      report = json.load(f)
    ((setting, rows),) = report['table'].items()
    self.assertIn('synthetic, IID, update payload (1 rounds)', setting)
    methods = [row['method'] for row in rows]
    self.assertEqual(methods[0], 'float32')
    self.assertIn('clipq defaults, 1 b', methods)
    self.assertIn('tff_encoded, 2 b', methods)
    for row in rows:
      self.assertEqual(row['seeds'], [0, 1])
      self.assertAllClose(row['accuracy_mean'], sum(row['accuracies']) / 2)
      self.assertGreaterEqual(row['accuracy_std'], 0.0)
      if row['method'] == 'float32':
        self.assertIsNone(row['quantized_accuracy_mean'])
      else:
        self.assertIsNotNone(row['quantized_accuracy_mean'])
    # One verdict per goal that applies: 1 and 2 bits (update payload, IID).
    self.assertLen(report['goals'], 2)
    with open(results + '_main.md') as f:
      text = f.read()
    self.assertIn('| clipq defaults, 2 b |', text)
    self.assertIn('## Goals', text)
    self.assertTrue(os.path.exists(results + '_main.png'))


if __name__ == '__main__':
  tf.test.main()
