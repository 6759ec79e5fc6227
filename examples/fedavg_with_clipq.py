"""FedAvg on TFF with clipq compressing every client upload: a complete, runnable example.

  python examples/fedavg_with_clipq.py                      # synthetic data, 5 rounds, offline
  python examples/fedavg_with_clipq.py --dataset=mnist      # MNIST ($TFF_CLIPQ_MNIST_DIR, or Keras)

Data, a Keras model wrapped by `tff.learning.models.from_keras_model`, TFF's weighted FedAvg with
`aggregators.clipped_quantization_mean` as its model aggregator, and the round loop. The
aggregator's measurements are in `output.metrics['aggregator']['quantized']`. The execution
context comes from `tff_clipq.runtime`: TFF's default one starts a `worker_binary` process that
can outlive this script and keep a pipe (`python example.py | tail`) open.
"""

from __future__ import annotations

import argparse

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tff_clipq import aggregators
from tff_clipq import data
from tff_clipq import runtime


def keras_model(input_shape: tuple[int, ...], num_classes: int) -> tf.keras.Model:
  return tf.keras.Sequential(
    [
      tf.keras.layers.Input(input_shape),
      tf.keras.layers.Conv2D(16, 3, activation='relu'),
      tf.keras.layers.MaxPooling2D(),
      tf.keras.layers.Flatten(),
      tf.keras.layers.Dense(num_classes),
    ]
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--dataset', default='synthetic', choices=('synthetic', 'mnist'))
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--bits', type=int, default=2)
  args = parser.parse_args()

  # Leak-free local execution: the worker_binary is owned by this process and ends with it.
  runtime.set_local_execution_context()

  federated = data.build_federated_data(args.dataset, partition='iid', num_clients=20, seed=0)
  element_spec = federated.train.element_type_structure
  input_spec = (
    tf.TensorSpec([None, *element_spec['x'].shape], tf.float32),
    tf.TensorSpec([None], tf.int32),
  )

  def model_fn() -> tff.learning.models.VariableModel:
    return tff.learning.models.from_keras_model(
      keras_model(federated.input_shape, federated.num_classes),
      loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      input_spec=input_spec,
      metrics=[tf.keras.metrics.SparseCategoricalAccuracy()],
    )

  process = tff.learning.algorithms.build_weighted_fed_avg(
    model_fn,
    client_optimizer_fn=tff.learning.optimizers.build_sgdm(0.05, momentum=0.9),
    # clipq's defaults: no clipping (max_abs), stochastic rounding, FedAvg weights.
    model_aggregator=aggregators.clipped_quantization_mean(bits=args.bits),
  )
  state = process.initialize()
  rng = np.random.default_rng(0)
  for round_num in range(1, args.rounds + 1):
    clients = rng.choice(federated.train.client_ids, size=5, replace=False)
    client_data = [
      federated.train.create_tf_dataset_for_client(client)
      .map(lambda example: (example['x'], example['y']))
      .batch(32)
      for client in clients
    ]
    output = process.next(state, client_data)
    state = output.state
    train = output.metrics['client_work']['train']
    quantized = output.metrics['aggregator']['quantized']
    print(
      f'round {round_num}: train accuracy {train["sparse_categorical_accuracy"]:.3f}, '
      f'{int(quantized["client_upload_bits"]):,} bits per client '
      f'({float(quantized["compression_ratio"]):.1f}x smaller than float32), '
      f'normalized quantization MSE {float(quantized["normalized_mse"]):.3f}',
      flush=True,
    )


if __name__ == '__main__':
  main()
