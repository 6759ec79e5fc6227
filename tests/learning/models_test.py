"""Tests for `tff_clipq.learning.models`: architectures, seeding, tensor order, TFF wrapping."""

import collections

from absl.testing import parameterized
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from tff_clipq.learning import models
from tff_clipq.learning import qat

MNIST_SHAPE = (28, 28, 1)
DIGITS_SHAPE = (8, 8, 1)
CNN_TENSOR_NAMES = (
  'conv1/kernel',
  'conv1/bias',
  'conv2/kernel',
  'conv2/bias',
  'dense1/kernel',
  'dense1/bias',
  'logits/kernel',
  'logits/bias',
)


def _client_data(seed: int, input_shape=DIGITS_SHAPE, num_examples: int = 12) -> tf.data.Dataset:
  rng = np.random.default_rng(seed)
  return tf.data.Dataset.from_tensor_slices(
    collections.OrderedDict(
      x=rng.normal(size=(num_examples, *input_shape)).astype(np.float32),
      y=rng.integers(0, 10, num_examples).astype(np.int32),
    )
  ).batch(4)


class CreateKerasModelTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.product(name=models.MODEL_NAMES, input_shape=(MNIST_SHAPE, DIGITS_SHAPE))
  def test_outputs_one_logit_per_class(self, name, input_shape):
    model = models.create_keras_model(name, input_shape, num_classes=10, seed=0)
    logits = model(tf.zeros([3, *input_shape]))
    self.assertEqual(logits.shape, (3, 10))
    self.assertEqual(logits.dtype, tf.float32)

  @parameterized.parameters(*models.MODEL_NAMES)
  def test_has_no_non_trainable_variables(self, name):
    # FedAvg averages trainable variables only: BatchNorm statistics would never be aggregated.
    model = models.create_keras_model(name, seed=0)
    self.assertEmpty(model.non_trainable_variables)

  def test_cnn_is_the_paper_architecture_on_mnist(self):
    model = models.create_keras_model('cnn', MNIST_SHAPE, seed=0)
    self.assertEqual(
      [(layer.name, type(layer).__name__) for layer in model.layers],
      [
        ('conv1', 'Conv2D'),
        ('pool1', 'MaxPooling2D'),
        ('conv2', 'Conv2D'),
        ('pool2', 'MaxPooling2D'),
        ('flatten', 'Flatten'),
        ('dense1', 'Dense'),
        ('logits', 'Dense'),
      ],
    )
    for name in ('conv1', 'conv2'):
      conv = model.get_layer(name)
      self.assertEqual((conv.filters, conv.kernel_size, conv.padding), (16, (3, 3), 'valid'))
      self.assertIs(conv.activation, tf.keras.activations.tanh)
    for name in ('pool1', 'pool2'):
      self.assertEqual(model.get_layer(name).pool_size, (2, 2))
    self.assertEqual(model.get_layer('dense1').units, 100)
    self.assertIs(model.get_layer('dense1').activation, tf.keras.activations.tanh)
    self.assertIs(model.get_layer('logits').activation, tf.keras.activations.linear)
    # 28 -conv-> 26 -pool-> 13 -conv-> 11 -pool-> 5: 5*5*16 = 400 features into dense1.
    expected = (3 * 3 * 1 * 16 + 16) + (3 * 3 * 16 * 16 + 16) + (400 * 100 + 100) + (100 * 10 + 10)
    self.assertEqual(expected, 43590)
    self.assertEqual(model.count_params(), expected)

  def test_cnn_uses_same_padding_on_8x8_digits(self):
    model = models.create_keras_model('cnn', DIGITS_SHAPE, seed=0)
    self.assertEqual(model.get_layer('conv1').padding, 'same')
    # 8 -conv-> 8 -pool-> 4 -conv-> 4 -pool-> 2: 2*2*16 = 64 features into dense1.
    self.assertEqual(model.get_layer('dense1').kernel.shape, (64, 100))
    self.assertEqual(model.count_params(), 160 + 2320 + (64 * 100 + 100) + 1010)

  def test_cnn_padding_switches_where_valid_padding_runs_out(self):
    self.assertEqual(models.cnn_padding((10, 10, 1)), 'valid')  # 10 -> 8 -> 4 -> 2 -> 1.
    self.assertEqual(models.cnn_padding((9, 28, 1)), 'same')  # 9 -> 7 -> 3 -> 1 -> 0.

  def test_mlp_and_logistic_layers(self):
    mlp = models.create_keras_model('mlp', MNIST_SHAPE, seed=0)
    self.assertEqual(
      [w.shape for w in mlp.trainable_variables],
      [(784, 200), (200,), (200, 200), (200,), (200, 10), (10,)],
    )
    logistic = models.create_keras_model('logistic', MNIST_SHAPE, seed=0)
    self.assertEqual([w.shape for w in logistic.trainable_variables], [(784, 10), (10,)])

  @parameterized.parameters(*models.MODEL_NAMES)
  def test_seed_makes_initial_weights_deterministic(self, name):
    first = models.create_keras_model(name, DIGITS_SHAPE, seed=7).get_weights()
    second = models.create_keras_model(name, DIGITS_SHAPE, seed=7).get_weights()
    other_seed = models.create_keras_model(name, DIGITS_SHAPE, seed=8).get_weights()
    unseeded = models.create_keras_model(name, DIGITS_SHAPE).get_weights()
    for a, b in zip(first, second):
      self.assertAllEqual(a, b)
    kernels = slice(0, None, 2)
    for a, b, c in zip(first[kernels], other_seed[kernels], unseeded[kernels]):
      self.assertNotAllClose(a, b)
      self.assertNotAllClose(a, c)

  def test_layers_of_equal_shape_get_different_initial_weights(self):
    model = models.create_keras_model('mlp', (20, 10, 1), seed=3)  # 200 inputs: two 200x200.
    first, second = model.get_layer('dense1').kernel, model.get_layer('dense2').kernel
    self.assertEqual(first.shape, second.shape)
    self.assertNotAllClose(first, second)

  def test_unknown_model_name_raises(self):
    with self.assertRaisesRegex(
      ValueError, r"`model` must be one of \('cnn', 'mlp', 'logistic'\). Found 'resnet'"
    ):
      models.create_keras_model('resnet')

  @parameterized.named_parameters(
    ('two_dims', dict(input_shape=(28, 28))),
    ('zero_size', dict(input_shape=(0, 28, 1))),
    ('one_class', dict(num_classes=1)),
    ('negative_seed', dict(seed=-1)),
  )
  def test_invalid_arguments_raise(self, kwargs):
    with self.assertRaises(ValueError):
      models.create_keras_model('cnn', **kwargs)


class TensorOrderTest(tf.test.TestCase):
  def test_model_input_spec(self):
    self.assertEqual(
      models.model_input_spec(DIGITS_SHAPE),
      collections.OrderedDict(
        x=tf.TensorSpec([None, 8, 8, 1], tf.float32), y=tf.TensorSpec([None], tf.int32)
      ),
    )

  def test_cnn_tensor_names_follow_trainable_variables(self):
    model = models.create_keras_model('cnn', seed=0)
    names = models.trainable_tensor_names(model)
    self.assertEqual(names, CNN_TENSOR_NAMES)
    layers_and_weights = [name.split('/') for name in names]
    self.assertEqual(
      [
        model.get_layer(layer).trainable_variables[('kernel', 'bias').index(weight)].shape
        for layer, weight in layers_and_weights
      ],
      [variable.shape for variable in model.trainable_variables],
    )

  def test_tff_model_lists_trainable_variables_in_keras_order(self):
    model_fn = models.build_tff_model_fn('cnn', MNIST_SHAPE, seed=0)
    tff_model = model_fn()
    keras_model = models.create_keras_model('cnn', MNIST_SHAPE, seed=0)
    self.assertEqual(
      [variable.shape for variable in tff_model.trainable_variables],
      [variable.shape for variable in keras_model.trainable_variables],
    )
    for tff_variable, keras_variable in zip(
      tff_model.trainable_variables, keras_model.trainable_variables
    ):
      self.assertAllEqual(tff_variable, keras_variable)

  def test_bits_per_layer_expand_to_kernel_and_bias(self):
    model = models.create_keras_model('cnn', seed=0)
    self.assertEqual(models.bits_per_tensor(model, (4, 2, 2, 4)), (4, 4, 2, 2, 2, 2, 4, 4))

  def test_bits_per_layer_of_wrong_length_raises(self):
    model = models.create_keras_model('cnn', seed=0)
    with self.assertRaisesRegex(ValueError, r'has 4 .*Found 3'):
      models.bits_per_tensor(model, (4, 2, 4))

  def test_variables_outside_layers_raise(self):

    class ScaledDense(tf.keras.Model):
      def __init__(self):
        super().__init__(name='scaled_dense')
        self.dense = tf.keras.layers.Dense(2, name='dense')
        self.scale = tf.Variable(1.0, name='scale')  # Trainable, but in no layer.

      def call(self, inputs):
        return self.scale * self.dense(inputs)

    model = ScaledDense()
    model(tf.zeros([1, 3]))
    with self.assertRaisesRegex(ValueError, 'not ordered layer by layer'):
      models.trainable_tensor_names(model)


class BuildTffModelFnTest(tf.test.TestCase):
  def test_each_call_builds_fresh_variables(self):
    model_fn = models.build_tff_model_fn('logistic', DIGITS_SHAPE, seed=0)
    first, second = model_fn(), model_fn()
    self.assertIsInstance(first, tff.learning.models.VariableModel)
    self.assertNotIn(
      first.trainable_variables[0].ref(), [v.ref() for v in second.trainable_variables]
    )
    self.assertEqual(first.input_spec, models.model_input_spec(DIGITS_SHAPE))

  def test_bad_arguments_raise_when_building(self):
    with self.assertRaisesRegex(ValueError, "Found 'lenet'"):
      models.build_tff_model_fn('lenet')
    with self.assertRaisesRegex(ValueError, 'expected 2, found 3'):
      models.build_tff_model_fn('logistic', DIGITS_SHAPE, qat=qat.QatConfig(bits=(4, 4, 4)))

  def _run_one_round(self, model_fn, input_shape):
    process = tff.learning.algorithms.build_weighted_fed_avg(
      model_fn, client_optimizer_fn=tff.learning.optimizers.build_sgdm(0.05)
    )
    state = process.initialize()
    initial = process.get_model_weights(state)
    output = process.next(state, [_client_data(1, input_shape), _client_data(2, input_shape)])
    self.assertEqual(output.metrics['client_work']['train']['num_examples'], 24)
    self.assertTrue(np.isfinite(output.metrics['client_work']['train']['loss']))
    return initial, process.get_model_weights(output.state)

  def test_one_fed_avg_round_without_qat(self):
    model_fn = models.build_tff_model_fn('cnn', DIGITS_SHAPE, seed=0)
    initial, trained = self._run_one_round(model_fn, DIGITS_SHAPE)
    keras_model = models.create_keras_model('cnn', DIGITS_SHAPE, seed=0)
    self.assertEqual(
      [w.shape for w in trained.trainable], [v.shape for v in keras_model.trainable_variables]
    )
    self.assertEmpty(trained.non_trainable)
    self.assertNotAllClose(initial.trainable[0], trained.trainable[0])

  def test_one_fed_avg_round_with_qat(self):
    # Logistic regression keeps the test fast: each QAT tensor adds a threshold search to every
    # traced forward pass. The 10-element bias stays float (min_size_to_quantize).
    config = qat.QatConfig(bits=(2, 8), min_size_to_quantize=20)
    model_fn = models.build_tff_model_fn('logistic', DIGITS_SHAPE, seed=0, qat=config)
    initial, trained = self._run_one_round(model_fn, DIGITS_SHAPE)
    keras_model = models.create_keras_model('logistic', DIGITS_SHAPE, seed=0)
    self.assertEqual(
      [w.shape for w in trained.trainable], [v.shape for v in keras_model.trainable_variables]
    )
    # tfmot's wrapper adds one int32 `optimizer_step` per wrapped layer, QAT the kernel's cached
    # threshold and pass counter. FedAvg leaves them at their initial zeros on the server, so
    # every client round starts with an empty cache and computes the threshold afresh.
    self.assertEqual(
      [(w.dtype, w.shape) for w in trained.non_trainable],
      [(np.int32, ()), (np.float32, ()), (np.int32, ())],
    )
    for value in trained.non_trainable[1:]:
      self.assertEqual(value, 0)
    self.assertNotAllClose(initial.trainable[0], trained.trainable[0])
    # The server's weights load into the plain (float) model for evaluation.
    tf.nest.map_structure(
      lambda v, w: v.assign(w), keras_model.trainable_variables, list(trained.trainable)
    )
    self.assertAllEqual(keras_model.trainable_variables[0], trained.trainable[0])

  @pytest.mark.slow
  def test_one_fed_avg_round_with_qat_cnn(self):
    # Every tensor of the paper's CNN quantized, at the paper's 4-2-2-4 bits per layer.
    keras_model = models.create_keras_model('cnn', DIGITS_SHAPE, seed=0)
    config = qat.QatConfig(bits=models.bits_per_tensor(keras_model, (4, 2, 2, 4)))
    model_fn = models.build_tff_model_fn('cnn', DIGITS_SHAPE, seed=0, qat=config)
    _, trained = self._run_one_round(model_fn, DIGITS_SHAPE)
    self.assertEqual(
      [w.shape for w in trained.trainable], [v.shape for v in keras_model.trainable_variables]
    )
    # Per layer tfmot's `optimizer_step`; per tensor QAT's cached threshold and pass counter.
    self.assertLen(trained.non_trainable, 4 + 2 * 8)


if __name__ == '__main__':
  tf.test.main()
