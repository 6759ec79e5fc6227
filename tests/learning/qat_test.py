"""Tests for `tff_clipq.learning.qat`: quantized forward pass, straight-through gradient."""

from absl.testing import parameterized
import numpy as np
import tensorflow as tf

from tff_clipq import quantization
from tff_clipq.learning import models
from tff_clipq.learning import qat
from tff_clipq.learning import qat_quantizers


def _dense_model(units=(3,), input_size: int = 4, seed: int = 0) -> tf.keras.Model:
  """Dense layers d1, d2, ... with heavy-tailed random weights (so that clipping matters)."""
  rng = np.random.default_rng(seed)
  layers = [tf.keras.layers.Dense(n, name=f'd{i + 1}') for i, n in enumerate(units)]
  model = tf.keras.Sequential([tf.keras.Input([input_size]), *layers])
  model.set_weights([rng.standard_t(3, size=w.shape).astype(np.float32) for w in model.weights])
  return model


def _quantized(weights, bits, clipping='octav'):
  threshold = quantization.clipping_threshold(weights, bits, clipping)
  return quantization.fake_quantize(weights, bits, threshold)


def _squared_error(outputs):
  return tf.reduce_sum(tf.square(outputs - 1.0))


class QatConfigTest(tf.test.TestCase, parameterized.TestCase):
  def test_defaults_and_sequence_bits(self):
    config = qat.QatConfig(bits=[4, 2])
    self.assertEqual(config.bits, (4, 2))
    self.assertEqual(
      (config.clipping, config.rounding, config.min_size_to_quantize), ('octav', 'nearest', 0)
    )
    self.assertEqual(config.bits_per_tensor(2), (4, 2))
    self.assertEqual(qat.QatConfig(bits=3).bits_per_tensor(4), (3, 3, 3, 3))

  @parameterized.named_parameters(
    ('zero_bits', dict(bits=0), '`bits` must be an integer in \\[1, 16\\]. Found 0'),
    ('too_many_bits', dict(bits=(4, 17)), 'Found 17'),
    ('bool_bits', dict(bits=True), 'Found True'),
    ('empty_bits', dict(bits=()), 'non-empty'),
    ('clipping', dict(bits=4, clipping='mse'), "`clipping` must be one of .* Found 'mse'"),
    ('negative_clipping', dict(bits=4, clipping=-1.0), 'Found -1.0'),
    ('rounding', dict(bits=4, rounding='up'), "`rounding` must be one of .* Found 'up'"),
    ('min_size', dict(bits=4, min_size_to_quantize=-1), '`min_size_to_quantize` .* Found -1'),
  )
  def test_invalid_values_raise(self, kwargs, message):
    with self.assertRaisesRegex(ValueError, message):
      qat.QatConfig(**kwargs)

  def test_wrong_number_of_bits_raises_with_expected_length(self):
    with self.assertRaisesRegex(ValueError, 'expected 8, found 4'):
      qat.apply_qat(models.create_keras_model('cnn', seed=0), qat.QatConfig(bits=(4, 2, 2, 4)))


class ForwardPassTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.parameters('octav', 'octav_paper', 'max_abs', 0.5)
  def test_dense_output_uses_quantized_kernel(self, clipping):
    model = _dense_model()
    kernel, bias = model.get_weights()
    # The 3-element bias stays float; the 12-element kernel is quantized to 3 bits.
    config = qat.QatConfig(bits=3, clipping=clipping, min_size_to_quantize=4)
    qat_model = qat.apply_qat(model, config)
    x = np.random.default_rng(1).normal(size=(5, 4)).astype(np.float32)
    expected = x @ _quantized(kernel, 3, clipping).numpy() + bias
    self.assertAllClose(qat_model(x), expected, rtol=1e-5, atol=1e-5)
    self.assertAllClose(qat_model(x, training=True), expected, rtol=1e-5, atol=1e-5)
    self.assertNotAllClose(qat_model(x), model(x), atol=1e-2)

  def test_octav_clips_the_kernel(self):
    model = _dense_model(units=(50,), input_size=40)
    qat_model = qat.apply_qat(model, qat.QatConfig(bits=2, min_size_to_quantize=100))
    kernel = model.get_layer('d1').kernel
    effective_kernel = qat_model.get_layer('quant_d1')(tf.eye(40)) - model.get_layer('d1').bias
    threshold = quantization.optimal_clipping_threshold(kernel, 2)
    self.assertLess(threshold, 0.5 * tf.reduce_max(tf.abs(kernel)))  # t(3) weights: clipped.
    self.assertAllClose(tf.reduce_max(tf.abs(effective_kernel)), threshold, rtol=1e-5)
    # The four 2-bit levels, +-s and +-s/3 (in units of s: rounding cannot split a level).
    self.assertLen(np.unique(np.round(effective_kernel.numpy() / threshold.numpy(), 4)), 4)

  def test_bits_apply_to_tensors_in_order(self):
    model = _dense_model(units=(6, 5), input_size=8)
    qat_model = qat.apply_qat(model, qat.QatConfig(bits=(2, 8, 3, 16)))
    eye = tf.eye(8)
    d1 = qat_model.get_layer('quant_d1')
    d1_bias = _quantized(model.get_layer('d1').bias, 8)
    self.assertAllClose(d1(eye) - d1_bias, _quantized(model.get_layer('d1').kernel, 2), atol=1e-5)
    d2 = qat_model.get_layer('quant_d2')
    d2_bias = _quantized(model.get_layer('d2').bias, 16)
    self.assertAllClose(
      d2(tf.eye(6)) - d2_bias, _quantized(model.get_layer('d2').kernel, 3), atol=1e-5
    )

  def test_stochastic_upload_uses_its_threshold_with_deterministic_nearest_forward(self):
    model = _dense_model(units=(30,), input_size=20)
    bias = model.get_layer('d1').bias
    qat_model = qat.apply_qat(
      model, qat.QatConfig(bits=2, rounding='stochastic', min_size_to_quantize=100)
    )
    kernel = model.get_layer('d1').kernel
    threshold = quantization.optimal_clipping_threshold(kernel, 2, 'stochastic')
    expected = quantization.fake_quantize(kernel, 2, threshold, 'nearest')
    draws = [qat_model(tf.eye(20)) - bias for _ in range(2)]
    self.assertAllClose(draws[0], expected, atol=1e-5)
    self.assertAllEqual(draws[0], draws[1])  # Deterministic: no rounding noise in training.
    nearest_threshold = quantization.optimal_clipping_threshold(kernel, 2, 'nearest')
    self.assertNotAllClose(threshold, nearest_threshold)

  def test_only_weighted_layers_are_wrapped_and_activations_are_not_quantized(self):
    model = models.create_keras_model('cnn', seed=0)
    qat_model = qat.apply_qat(model, qat.QatConfig(bits=4, min_size_to_quantize=200))
    # conv1 (144 + 16 elements) stays float entirely; every other weighted layer is wrapped.
    self.assertEqual(
      [(layer.name, type(layer).__name__) for layer in qat_model.layers],
      [
        ('conv1', 'Conv2D'),
        ('pool1', 'MaxPooling2D'),
        ('quant_conv2', 'QuantizeWrapperV2'),
        ('pool2', 'MaxPooling2D'),
        ('flatten', 'Flatten'),
        ('quant_dense1', 'QuantizeWrapperV2'),
        ('quant_logits', 'QuantizeWrapperV2'),
      ],
    )
    for name in ('quant_conv2', 'quant_dense1', 'quant_logits'):
      config = qat_model.get_layer(name).quantize_config
      self.assertEqual(config.weight_names, ('kernel',))  # Biases are below 200 elements.
      self.assertEqual(config.get_activations_and_quantizers(None), [])
      self.assertEqual(config.get_output_quantizers(None), [])

  def test_nothing_to_quantize_gives_a_float_copy(self):
    model = _dense_model()
    qat_model = qat.apply_qat(model, qat.QatConfig(bits=2, min_size_to_quantize=1000))
    x = tf.ones([2, 4])
    self.assertAllEqual(qat_model(x), model(x))
    self.assertNotIn(
      qat_model.trainable_variables[0].ref(), [v.ref() for v in model.trainable_variables]
    )


class GradientTest(tf.test.TestCase):
  def test_gradient_is_straight_through(self):
    model = _dense_model(units=(3,), input_size=4)
    kernel, bias = model.get_weights()
    qat_model = qat.apply_qat(model, qat.QatConfig(bits=(2, 2)))
    x = tf.constant(np.random.default_rng(2).normal(size=(6, 4)), tf.float32)

    with tf.GradientTape() as tape:
      loss = _squared_error(qat_model(x, training=True))
    qat_gradients = tape.gradient(loss, qat_model.trainable_variables)

    # The plain model at the quantized weights: STE gradients must equal its gradients.
    at_quantized = _dense_model(units=(3,), input_size=4)
    at_quantized.set_weights([_quantized(kernel, 2).numpy(), _quantized(bias, 2).numpy()])
    with tf.GradientTape() as tape:
      loss = _squared_error(at_quantized(x))
    expected = tape.gradient(loss, at_quantized.trainable_variables)
    with tf.GradientTape() as tape:
      loss = _squared_error(model(x))
    at_float = tape.gradient(loss, model.trainable_variables)

    for qat_gradient, expected_gradient, float_gradient in zip(qat_gradients, expected, at_float):
      self.assertIsNotNone(qat_gradient)
      self.assertAllClose(qat_gradient, expected_gradient, rtol=1e-5, atol=1e-5)
      self.assertNotAllClose(qat_gradient, float_gradient, atol=1e-2)

  def test_qat_training_reduces_loss(self):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(256, 4, 4, 1)).astype(np.float32)
    y = (x[:, :2].sum(axis=(1, 2, 3)) > x[:, 2:].sum(axis=(1, 2, 3))).astype(np.int32)
    model = models.create_keras_model('mlp', (4, 4, 1), num_classes=2, seed=0)
    qat_model = qat.apply_qat(model, qat.QatConfig(bits=3))
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    optimizer = tf.keras.optimizers.SGD(0.1)

    @tf.function
    def train_step():
      with tf.GradientTape() as tape:
        loss = loss_fn(y, qat_model(x, training=True))
      optimizer.apply_gradients(
        zip(tape.gradient(loss, qat_model.trainable_variables), qat_model.trainable_variables)
      )
      return loss

    initial_loss = loss_fn(y, qat_model(x)).numpy()
    for _ in range(40):
      train_step()
    final_loss = loss_fn(y, qat_model(x)).numpy()
    self.assertLess(final_loss, 0.5 * initial_loss)


def _effective_kernel(qat_model: tf.keras.Model, model: tf.keras.Model) -> tf.Tensor:
  """The kernel the QAT layer 'd1' uses in a forward pass (its bias stays float here)."""
  size = model.get_layer('d1').kernel.shape[0]
  return qat_model.get_layer('quant_d1')(tf.eye(size)) - model.get_layer('d1').bias


class NearestLevelsTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.product(bits=(1, 2, 3, 4, 8), threshold=(0.0, 0.3, 1.0, 2.5))
  def test_matches_the_upload_quantizers_nearest_rounding(self, bits, threshold):
    weights = tf.constant(np.random.default_rng(bits).standard_t(3, size=4096), tf.float32)
    weights = tf.concat([weights, [threshold, -threshold, 0.0]], axis=0)
    expected = quantization.fake_quantize(weights, bits, threshold, 'nearest')
    levels = qat_quantizers._nearest_levels(weights, bits, tf.constant(threshold))
    self.assertAllClose(levels, expected, rtol=0.0, atol=1e-6 * max(threshold, 1.0))


class ThresholdRefreshTest(tf.test.TestCase, parameterized.TestCase):
  def _models(self, refresh_steps: int):
    model = _dense_model(units=(30,), input_size=20)
    config = qat.QatConfig(bits=2, min_size_to_quantize=100, threshold_refresh_steps=refresh_steps)
    qat_model = qat.apply_qat(model, config)
    return model, qat_model, qat_model.trainable_variables[0]  # d1's kernel.

  @staticmethod
  def _expected(kernel_value):
    return _quantized(tf.constant(kernel_value), 2)

  def test_every_pass(self):
    model, qat_model, kernel = self._models(1)
    for scale in (1.0, 3.0):
      kernel.assign(kernel * scale)
      self.assertAllClose(
        _effective_kernel(qat_model, model), self._expected(kernel.numpy()), atol=1e-5
      )

  @parameterized.parameters(2, 3)
  def test_every_n_passes(self, refresh_steps):
    model, qat_model, kernel = self._models(refresh_steps)
    start = kernel.numpy()
    for passes in range(2 * refresh_steps + 1):
      kernel.assign(start * (1.0 + passes))
      used = _effective_kernel(qat_model, model)
      # The threshold is the one of the last refresh (pass 0, N, 2N, ...), applied to the
      # current kernel.
      refreshed = start * (1.0 + passes - passes % refresh_steps)
      threshold = quantization.optimal_clipping_threshold(refreshed, 2)
      self.assertAllClose(used, quantization.fake_quantize(kernel, 2, threshold), atol=1e-5)

  def test_once_until_the_counter_is_reset(self):
    model, qat_model, kernel = self._models(0)
    start = kernel.numpy()
    first = _effective_kernel(qat_model, model)
    self.assertAllClose(first, self._expected(start), atol=1e-5)
    kernel.assign(start * 3.0)
    threshold = quantization.optimal_clipping_threshold(start, 2)
    for _ in range(3):  # Not refreshed: the first pass's threshold clips the grown kernel.
      self.assertAllClose(
        _effective_kernel(qat_model, model),
        quantization.fake_quantize(kernel, 2, threshold),
        atol=1e-5,
      )
    # What TFF does at the start of a client round: load the server's non-trainable values.
    for variable in qat_model.non_trainable_variables:
      variable.assign(tf.zeros_like(variable))
    self.assertAllClose(
      _effective_kernel(qat_model, model), self._expected(kernel.numpy()), atol=1e-5
    )

  def test_cached_threshold_in_a_tf_function_training_step(self):
    model, qat_model, kernel = self._models(0)
    optimizer = tf.keras.optimizers.SGD(0.1)
    x = tf.random.stateless_normal([8, 20], seed=[1, 2])

    @tf.function
    def step():
      with tf.GradientTape() as tape:
        loss = _squared_error(qat_model(x, training=True))
      gradients = tape.gradient(loss, qat_model.trainable_variables)
      optimizer.apply_gradients(zip(gradients, qat_model.trainable_variables))
      return loss

    start = kernel.numpy()
    for _ in range(3):
      step()
    cached = [v for v in qat_model.non_trainable_variables if 'clip_threshold' in v.name]
    passes = [v for v in qat_model.non_trainable_variables if 'threshold_passes' in v.name]
    self.assertAllClose(cached[0], quantization.optimal_clipping_threshold(start, 2), rtol=1e-6)
    self.assertEqual(int(passes[0]), 3)
    self.assertNotAllClose(kernel, start)  # Training moved the float kernel.

  @parameterized.parameters(-1, 1.5, True, '2')
  def test_invalid_refresh_steps_raise(self, steps):
    with self.assertRaisesRegex(ValueError, 'threshold_refresh_steps'):
      qat.QatConfig(bits=2, threshold_refresh_steps=steps)


class VariablesTest(tf.test.TestCase):
  def test_qat_model_has_the_plain_trainable_variables(self):
    model = models.create_keras_model('cnn', seed=0)
    bits = models.bits_per_tensor(model, (4, 2, 2, 4))
    qat_model = qat.apply_qat(model, qat.QatConfig(bits=bits))
    self.assertEqual(models.trainable_tensor_names(qat_model), models.trainable_tensor_names(model))
    self.assertEqual(
      [v.shape for v in qat_model.trainable_variables], [v.shape for v in model.trainable_variables]
    )
    for qat_variable, variable in zip(qat_model.trainable_variables, model.trainable_variables):
      self.assertAllEqual(qat_variable, variable)
    layers = ('conv1', 'conv2', 'dense1', 'logits')
    cached = [
      (f'quant_{layer}/{weight}_{suffix}:0', dtype, ())
      for layer in layers
      for weight in ('kernel', 'bias')
      for suffix, dtype in (('clip_threshold', tf.float32), ('threshold_passes', tf.int32))
    ]
    expected = [(f'quant_{layer}/optimizer_step:0', tf.int32, ()) for layer in layers] + cached
    self.assertCountEqual(
      [(v.name, v.dtype, tuple(v.shape)) for v in qat_model.non_trainable_variables], expected
    )
    # Refreshing at every pass keeps no state beyond tfmot's step counters.
    stateless = qat.apply_qat(model, qat.QatConfig(bits=bits, threshold_refresh_steps=1))
    self.assertEqual(
      [(v.name, v.dtype, tuple(v.shape)) for v in stateless.non_trainable_variables],
      [(f'quant_{layer}/optimizer_step:0', tf.int32, ()) for layer in layers],
    )

  def test_qat_model_owns_its_variables(self):
    model = _dense_model()
    qat_model = qat.apply_qat(model, qat.QatConfig(bits=4))
    before = model.get_weights()
    for variable in qat_model.trainable_variables:
      variable.assign_add(tf.ones_like(variable))
    for weight, expected in zip(model.get_weights(), before):
      self.assertAllEqual(weight, expected)

  def test_quantizer_refreshing_every_pass_creates_no_variables(self):
    quantizer = qat_quantizers.ClippedUniformWeightQuantizer(4, threshold_refresh_steps=1)
    self.assertEqual(quantizer.build(tf.TensorShape([3, 3]), 'kernel', None), {})
    restored = qat_quantizers.ClippedUniformWeightQuantizer.from_config(quantizer.get_config())
    self.assertEqual((restored.bits, restored.threshold_refresh_steps), (4, 1))

  def test_unsupported_layer_raises(self):
    model = tf.keras.Sequential(
      [
        tf.keras.Input([4]),
        tf.keras.layers.LayerNormalization(name='norm'),
        tf.keras.layers.Dense(2),
      ]
    )
    with self.assertRaisesRegex(ValueError, "Found layer 'norm' of type LayerNormalization"):
      qat.apply_qat(model, qat.QatConfig(bits=4))

  def test_wrapping_twice_raises(self):
    qat_model = qat.apply_qat(_dense_model(), qat.QatConfig(bits=4))
    with self.assertRaisesRegex(ValueError, 'already wrapped'):
      qat.apply_qat(qat_model, qat.QatConfig(bits=4))

  def test_config_must_be_a_qat_config(self):
    with self.assertRaisesRegex(TypeError, 'Found dict'):
      qat.apply_qat(_dense_model(), {'bits': 4})


if __name__ == '__main__':
  tf.test.main()
