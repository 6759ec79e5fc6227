"""The compute floor of `round_time.py`: FedAvg rounds in plain TensorFlow, without TFF.

`ClientTrainer` is one client's local training as TFF's FedAvg client runs it: from the global
weights, SGD with momentum (TFF's `build_sgdm`: v <- m v + g, w <- w - lr v) over the client's
batches, in an iterator loop (TFF's `DATASET_ITERATOR`). `KerasFloor` trains a round's clients
one after another with it and applies the example-weighted mean of their deltas: the least a
FedAvg round can cost. `aggregator_cost.py` times `ClientTrainer` alone as the FedAvg client's
work, so both benchmarks compare against the same loop.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from benchmarks import round_time_variants as variants
from tff_clipq.learning import models
from tff_clipq.learning import process as process_lib
from tff_clipq.learning import qat as qat_lib


class ClientTrainer:
  """Local training of one client from the global weights; `train` runs in a `tf.function`.

  The global weights start as the model's; QAT's cached thresholds and pass counters (the
  non-trainable variables) are reset per client, as TFF loads them per round.

  Args:
    model: the Keras model trained in place (its trainable variables are the client's weights).
    learning_rate: the client's SGD learning rate.
    momentum: the client's SGD momentum.
  """

  def __init__(self, model: tf.keras.Model, learning_rate: float, momentum: float):
    self.model = model
    self.global_weights = [tf.Variable(v) for v in model.trainable_variables]
    self.initial_non_trainable = [tf.Variable(v) for v in model.non_trainable_variables]
    self.velocities = [tf.Variable(tf.zeros_like(v)) for v in model.trainable_variables]
    self.learning_rate = learning_rate
    self.momentum = momentum
    self.loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

  def train(self, dataset: tf.data.Dataset) -> tf.Tensor:
    """Trains on `dataset` (batches of {'x', 'y'}) from the global weights; returns its size."""
    variables = self.model.trainable_variables
    for variable, start in zip(variables, self.global_weights):
      variable.assign(start)
    for variable, start in zip(self.model.non_trainable_variables, self.initial_non_trainable):
      variable.assign(start)
    for velocity in self.velocities:
      velocity.assign(tf.zeros_like(velocity))
    examples = tf.constant(0.0)
    # `iter`: AutoGraph turns `for batch in dataset` into `dataset.reduce`, whose body runs in
    # tf.data's function runtime, ~2.8x slower here; the iterator loop is TFF's DATASET_ITERATOR.
    for batch in iter(dataset):
      with tf.GradientTape() as tape:
        logits = self.model(batch['x'], training=True)
        loss = self.loss_fn(batch['y'], logits)
      gradients = tape.gradient(loss, variables)
      for variable, velocity, gradient in zip(variables, self.velocities, gradients):
        velocity.assign(self.momentum * velocity + gradient)
        variable.assign_sub(self.learning_rate * velocity)
      examples += tf.cast(tf.shape(batch['y'])[0], tf.float32)
    return examples


class KerasFloor:
  """FedAvg rounds in plain TF: sequential local training, then the weighted mean of deltas.

  `train_client` is one `tf.function`, traced once per dataset element spec: it trains one
  client (`ClientTrainer.train`) and adds its example-weighted delta to the round's sums.

  Args:
    spec: the variant (a floor: `spec.method` is None; `spec.qat` trains the QAT model).
    workload: what all variants share.
  """

  def __init__(self, spec: variants.VariantSpec, workload: variants.Workload):
    config = variants.process_config(spec, workload)
    model = models.create_keras_model(
      'cnn', workload.input_shape, workload.num_classes, workload.seed
    )
    qat_config = (
      process_lib.qat_config(
        dataclasses.replace(
          config, aggregator=dataclasses.replace(config.aggregator, method='clipq')
        )
      )
      if spec.qat
      else None
    )
    self.trainer = ClientTrainer(
      qat_lib.apply_qat(model, qat_config) if qat_config else model,
      config.client_learning_rate,
      config.client_momentum,
    )
    variables = self.trainer.model.trainable_variables
    self.delta_sums = [tf.Variable(tf.zeros_like(v)) for v in variables]
    self.example_sum = tf.Variable(0.0)

  @tf.function
  def train_client(self, dataset: tf.data.Dataset) -> None:
    examples = self.trainer.train(dataset)
    variables = self.trainer.model.trainable_variables
    for total, variable, start in zip(self.delta_sums, variables, self.trainer.global_weights):
      total.assign_add(examples * (variable - start))
    self.example_sum.assign_add(examples)

  @tf.function
  def apply_mean(self) -> None:
    for weights, total in zip(self.trainer.global_weights, self.delta_sums):
      weights.assign_add(tf.math.divide_no_nan(total, self.example_sum))
      total.assign(tf.zeros_like(total))
    self.example_sum.assign(0.0)

  def run_round(self, datasets: list[tf.data.Dataset]) -> None:
    for dataset in datasets:
      self.train_client(dataset)
    self.apply_mean()
    self.trainer.global_weights[0].numpy()  # Block until done.
