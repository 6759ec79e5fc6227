"""The runner's absl flags: one per `ExperimentConfig` field, under the same name.

Importing this module defines no flag; `define_flags()` does, so tests can define them in their
own `FlagValues`. `config.ExperimentConfig.from_flags()` reads them back.
"""

from __future__ import annotations

import dataclasses

from absl import flags

from tff_clipq import aggregators
from tff_clipq import data as data_lib
from tff_clipq.experiments.config import ExperimentConfig
from tff_clipq.experiments.config import PARTITIONS
from tff_clipq.learning import broadcast as broadcast_lib
from tff_clipq.learning import models
from tff_clipq.learning import process as process_lib
from tff_clipq.quantization import quantizer
from tff_clipq.quantization import thresholds


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines one flag per `ExperimentConfig` field in `flag_values`, defaulting to its default."""
  defaults = {field.name: field.default for field in dataclasses.fields(ExperimentConfig)}
  default = defaults.__getitem__
  fv = dict(flag_values=flag_values)

  flags.DEFINE_enum(
    'dataset',
    default('dataset'),
    data_lib.FEDERATED_DATASET_NAMES,
    'Dataset. mnist/fashion_mnist load offline when on disk (--data_dir, '
    'TFF_CLIPQ_MNIST_DIR) and download otherwise; emnist (TFF federated '
    'EMNIST, clients are writers) downloads; digits and synthetic are offline.',
    **fv,
  )
  flags.DEFINE_string('data_dir', default('data_dir'), 'Where to read the dataset from.', **fv)
  flags.DEFINE_enum(
    'partition',
    default('partition'),
    PARTITIONS,
    'How the training set is split into clients (natural: emnist only).',
    **fv,
  )
  flags.DEFINE_float(
    'dirichlet_alpha',
    default('dirichlet_alpha'),
    'Dirichlet concentration of --partition=dirichlet (small: few labels per client).',
    **fv,
  )
  flags.DEFINE_integer(
    'shards_per_client',
    default('shards_per_client'),
    'Label-sorted shards per client for --partition=shards.',
    **fv,
  )
  flags.DEFINE_float(
    'size_sigma',
    default('size_sigma'),
    'Lognormal sigma of client sizes for --partition=iid (0: balanced).',
    **fv,
  )
  flags.DEFINE_integer('num_clients', default('num_clients'), 'Number of clients.', **fv)
  flags.DEFINE_integer(
    'clients_per_round',
    default('clients_per_round'),
    'Clients sampled (without replacement) each round.',
    **fv,
  )
  flags.DEFINE_integer('rounds', default('rounds'), 'Federated rounds.', **fv)
  flags.DEFINE_integer('local_epochs', default('local_epochs'), 'Client epochs per round.', **fv)
  flags.DEFINE_integer('batch_size', default('batch_size'), 'Client batch size.', **fv)
  for side in ('client', 'server'):
    flags.DEFINE_enum(
      f'{side}_optimizer',
      default(f'{side}_optimizer'),
      process_lib.OPTIMIZERS,
      f'{side.capitalize()} optimizer.',
      **fv,
    )
    flags.DEFINE_float(
      f'{side}_learning_rate',
      default(f'{side}_learning_rate'),
      f'{side.capitalize()} learning rate.',
      **fv,
    )
    flags.DEFINE_float(
      f'{side}_momentum',
      default(f'{side}_momentum'),
      f'{side.capitalize()} SGD momentum in [0, 1).',
      **fv,
    )
  flags.DEFINE_enum('model', default('model'), models.MODEL_NAMES, 'Model architecture.', **fv)
  flags.DEFINE_integer(
    'seed',
    default('seed'),
    'Seeds the data split, client sampling, shuffles, model and rounding.',
    **fv,
  )
  flags.DEFINE_enum(
    'aggregator',
    default('aggregator'),
    process_lib.AGGREGATORS,
    'Upload compression: float (float32 FedAvg), clipq (clipped uniform '
    'quantization) or tff_encoded (TFF min-max quantization).',
    **fv,
  )
  flags.DEFINE_string(
    'bits',
    default('bits'),
    'Bits per coordinate, or per layer with weights, e.g. 4-2-2-4, or a budget of average code '
    'bits per quantized coordinate within which each client chooses its widths per tensor, '
    'e.g. budget:2.15 (clipq).',
    **fv,
  )
  flags.DEFINE_string(
    'clipping',
    default('clipping'),
    f'Clipping threshold: {", ".join(thresholds.CLIPPING_METHODS)} or a fixed positive number.',
    **fv,
  )
  flags.DEFINE_enum('rounding', default('rounding'), quantizer.ROUNDING_MODES, 'Rounding.', **fv)
  flags.DEFINE_enum(
    'weighting',
    default('weighting'),
    aggregators.WEIGHTINGS,
    'How clipq weights clients in the mean.',
    **fv,
  )
  flags.DEFINE_integer(
    'min_size_to_quantize',
    default('min_size_to_quantize'),
    'Smaller tensors (biases) travel in float32.',
    **fv,
  )
  flags.DEFINE_boolean(
    'per_channel',
    default('per_channel'),
    'One clipping threshold per output channel (clipq).',
    **fv,
  )
  flags.DEFINE_enum(
    'rotation',
    default('rotation'),
    process_lib.ROTATIONS,
    "Random Hadamard rotation of each tensor before clipq quantizes it (TFF's "
    'HadamardTransformFactory; weighting example_count or uniform).',
    **fv,
  )
  flags.DEFINE_bool(
    'error_feedback',
    default('error_feedback'),
    'Each client adds what quantization removed from its last upload to its next one; the '
    'residuals (one model per client) are kept by the program and checkpointed (clipq, no '
    'rotation).',
    **fv,
  )
  flags.DEFINE_enum(
    'broadcast',
    default('broadcast'),
    broadcast_lib.BROADCASTS,
    'What the server broadcasts: the float32 model, the model quantized to --broadcast_bits, '
    "or its change since the clients' copy quantized (delta; assumes clients keep the last "
    'broadcast).',
    **fv,
  )
  flags.DEFINE_integer(
    'broadcast_bits',
    default('broadcast_bits'),
    'Bits per coordinate of a quantized broadcast (max_abs threshold, stochastic rounding).',
    **fv,
  )
  flags.DEFINE_float(
    'sample_fraction',
    default('sample_fraction'),
    "Fraction of each quantized tensor's entries a clipq client sends, in (0, 1]: a "
    'uniformly chosen subset, scaled back by the server (unbiased); 1 sends all.',
    **fv,
  )
  flags.DEFINE_enum(
    'payload',
    default('payload'),
    process_lib.PAYLOADS,
    'What clients upload: model updates or trained weights (the paper).',
    **fv,
  )
  flags.DEFINE_boolean(
    'qat',
    default('qat'),
    'Quantization-aware client training for the quantizing aggregators '
    '(float runs train without it). Off by default: it lowers the float '
    "model's accuracy (docs/results.md).",
    **fv,
  )
  flags.DEFINE_integer(
    'qat_threshold_refresh_steps',
    default('qat_threshold_refresh_steps'),
    'QAT recomputes each clipping threshold every this many local steps; 0: '
    'once per client round, at its first step.',
    **fv,
  )
  flags.DEFINE_integer(
    'eval_every',
    default('eval_every'),
    'Evaluate on the test set every this many rounds (and at the last).',
    **fv,
  )
  flags.DEFINE_integer(
    'max_eval_examples',
    default('max_eval_examples'),
    'Evaluate on the first this many test examples (0: all).',
    **fv,
  )
  flags.DEFINE_string(
    'output_dir',
    default('output_dir'),
    'Where metrics, checkpoints, summaries, tables and plots go.',
    **fv,
  )
  flags.DEFINE_boolean(
    'resume',
    default('resume'),
    'Continue the runs in --output_dir from their last checkpoint.',
    **fv,
  )
  flags.DEFINE_boolean(
    'overwrite',
    default('overwrite'),
    'Delete the runs already in --output_dir and start afresh.',
    **fv,
  )
  flags.DEFINE_string(
    'sweep',
    default('sweep'),
    'Runs to compare, ";"-separated, each ","-separated flag=value overrides, '
    'e.g. "aggregator=float; aggregator=clipq,bits=2".',
    **fv,
  )
  flags.DEFINE_list(
    'workers',
    list(default('workers')),
    'host:port of remote TFF workers (worker_binary) to run rounds on.',
    **fv,
  )
  flags.DEFINE_integer(
    'num_local_workers',
    default('num_local_workers'),
    'Start this many local TFF workers and split clients across them.',
    **fv,
  )
  flags.DEFINE_integer(
    'worker_intra_op_threads',
    default('worker_intra_op_threads'),
    'Threads one TensorFlow operation may use in the TFF workers started here '
    '(0: one per core). 1 is faster with many clients per round (100 on 2 '
    'cores: rounds 10-14% faster), slower with few (10: 20% slower).',
    **fv,
  )
