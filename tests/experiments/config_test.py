"""Tests for `tff_clipq.experiments.config`: flags, validation messages, sweeps."""

import os

from absl import flags
from absl.testing import parameterized
import tensorflow as tf

from tff_clipq.experiments import config as config_lib
from tff_clipq.experiments import flag_definitions

ExperimentConfig = config_lib.ExperimentConfig


def _parse(argv: list[str]) -> flags.FlagValues:
  flag_values = flags.FlagValues()
  flag_definitions.define_flags(flag_values)
  flag_values(['run_experiments.py', *argv])
  return flag_values


class FlagsTest(tf.test.TestCase):
  def test_every_field_is_a_flag_with_the_same_default(self):
    flag_values = _parse([])
    self.assertEqual(ExperimentConfig.from_flags(flag_values), ExperimentConfig())

  def test_from_flags_reads_values(self):
    flag_values = _parse(
      [
        '--dataset=synthetic',
        '--bits=4-2-2-4',
        '--clipping=0.05',
        '--qat',
        '--workers=a:1,b:2',
        '--sweep=aggregator=float; bits=2',
        '--client_learning_rate=0.1',
      ]
    )
    config = ExperimentConfig.from_flags(flag_values)
    self.assertEqual(config.dataset, 'synthetic')
    self.assertEqual(config.bits, '4-2-2-4')
    self.assertEqual(config.aggregator_config.clipping, 0.05)
    self.assertTrue(config.qat)
    self.assertEqual(config.workers, ('a:1', 'b:2'))
    self.assertEqual(config.client_learning_rate, 0.1)

  def test_unknown_choice_is_a_flag_error_naming_the_flag(self):
    with self.assertRaisesRegex(flags.IllegalFlagValueError, 'dataset'):
      _parse(['--dataset=cifar10'])

  def test_importing_the_package_defines_no_flags(self):
    self.assertNotIn('bits', flags.FLAGS)


class ValidationTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.named_parameters(
    ('bits_zero', dict(bits='0'), '--bits.*\\[1, 16\\]'),
    ('bits_17', dict(bits=17), '--bits.*\\[1, 16\\]'),
    ('bits_not_a_number', dict(bits='four'), '--bits'),
    ('bits_list_too_short_for_cnn', dict(bits='4-2-2'), '--bits lists 3.*cnn.*4 layers'),
    ('bits_list_for_logistic', dict(model='logistic', bits='4-2-2-4'), '--bits.*logistic.*1'),
    ('bits_list_entry_out_of_range', dict(bits='4-2-0-4'), '--bits'),
    ('bits_list_with_tff_encoded', dict(aggregator='tff_encoded', bits='4-2-2-4'), '--bits'),
    (
      'clients_per_round_above_num_clients',
      dict(num_clients=10, clients_per_round=11),
      '--clients_per_round.*--num_clients=10',
    ),
    ('zero_clients_per_round', dict(clients_per_round=0), '--clients_per_round'),
    ('alpha_zero', dict(dirichlet_alpha=0.0), '--dirichlet_alpha.*> 0'),
    ('alpha_negative', dict(dirichlet_alpha=-1.0), '--dirichlet_alpha'),
    ('client_learning_rate_zero', dict(client_learning_rate=0.0), '--client_learning_rate'),
    ('server_learning_rate_negative', dict(server_learning_rate=-1.0), '--server_learning_rate'),
    ('momentum_one', dict(client_momentum=1.0), '--client_momentum.*\\[0, 1\\)'),
    ('unknown_dataset', dict(dataset='cifar10'), '--dataset.*mnist'),
    ('unknown_model', dict(model='resnet'), '--model'),
    ('zero_rounds', dict(rounds=0), '--rounds.*>= 1'),
    ('zero_batch_size', dict(batch_size=0), '--batch_size'),
    ('zero_eval_every', dict(eval_every=0), '--eval_every'),
    ('negative_size_sigma', dict(size_sigma=-0.5), '--size_sigma'),
    ('natural_without_emnist', dict(partition='natural'), '--partition=natural.*emnist'),
    ('emnist_without_natural', dict(dataset='emnist', partition='iid'), '--partition=natural'),
    ('unknown_clipping', dict(clipping='median'), '--clipping'),
    ('negative_clipping', dict(clipping='-0.1'), '--clipping'),
    ('unknown_rounding', dict(rounding='floor'), '--rounding'),
    ('unknown_payload', dict(payload='gradients'), '--payload'),
    ('empty_output_dir', dict(output_dir=''), '--output_dir'),
    ('resume_and_overwrite', dict(resume=True, overwrite=True), '--resume.*--overwrite'),
    (
      'workers_and_local_workers',
      dict(workers=['localhost:1'], num_local_workers=2),
      '--workers.*--num_local_workers',
    ),
    ('worker_without_port', dict(workers=['localhost']), '--workers.*host:port'),
    ('negative_intra_op_threads', dict(worker_intra_op_threads=-1), '--worker_intra_op_threads'),
    (
      'intra_op_threads_with_remote_workers',
      dict(workers=['localhost:1'], worker_intra_op_threads=1),
      '--worker_intra_op_threads.*--workers',
    ),
    ('sweep_unknown_flag', dict(sweep='aggregator=float; colour=red'), '--sweep.*colour'),
    ('sweep_study_flag', dict(sweep='output_dir=x'), '--sweep.*output_dir'),
    ('sweep_bad_value', dict(sweep='aggregator=float; bits=17'), "--sweep run 'bits-17'.*--bits"),
    ('sweep_not_key_value', dict(sweep='aggregator'), '--sweep.*flag=value'),
    ('sweep_duplicate_run', dict(sweep='bits=2; bits=2'), '--sweep.*twice'),
  )
  def test_invalid_setting_names_the_flag(self, overrides, message):
    with self.assertRaisesRegex(config_lib.ConfigError, message):
      ExperimentConfig(**overrides)

  @parameterized.named_parameters(
    ('per_layer_bits_cnn', dict(bits='4-2-2-4')),
    ('per_layer_bits_mlp', dict(model='mlp', bits='8-4-8')),
    ('fixed_clipping', dict(clipping='0.05')),
    ('emnist_natural', dict(dataset='emnist', partition='natural')),
    ('int_bits', dict(bits=2)),
  )
  def test_valid_settings(self, overrides):
    ExperimentConfig(**overrides)


class SweepTest(tf.test.TestCase):
  def test_runs_apply_typed_overrides_to_the_base(self):
    base = ExperimentConfig(
      output_dir='out',
      rounds=7,
      sweep=(
        'aggregator=float; aggregator=clipq,bits=2,rounding=nearest; per_channel=true,'
        'client_learning_rate=0.05'
      ),
    )
    runs = base.sweep_runs()
    self.assertEqual(
      [name for name, _ in runs],
      [
        'aggregator-float',
        'aggregator-clipq_bits-2_rounding-nearest',
        'per_channel-true_client_learning_rate-0.05',
      ],
    )
    configs = [config for _, config in runs]
    self.assertEqual(configs[0].aggregator, 'float')
    self.assertEqual(configs[1].bits, '2')
    self.assertEqual(configs[1].rounding, 'nearest')
    self.assertIs(configs[2].per_channel, True)
    self.assertEqual(configs[2].client_learning_rate, 0.05)
    for name, config in runs:
      self.assertEqual(config.output_dir, os.path.join('out', name))
      self.assertEqual(config.sweep, '')
      self.assertEqual(config.data_settings, base.data_settings)
      self.assertEqual(config.rounds, 7)

  def test_single_run_writes_to_output_dir(self):
    self.assertEqual(
      ExperimentConfig(output_dir='runs/one/').sweep_runs(),
      [('one', ExperimentConfig(output_dir='runs/one/'))],
    )


if __name__ == '__main__':
  tf.test.main()
