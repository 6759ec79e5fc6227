"""The deployed model: the global model's weights through the run's B-bit quantizer.

Quantization-aware training (QAT) trains each client through a B-bit forward pass, so what it
should improve is the accuracy of a model whose weights are themselves quantized, the model a
bandwidth- or memory-bound device would run, not that of the float global model. Every quantizing
run therefore also evaluates its global model with each tensor of at least `min_size_to_quantize`
entries clipped and rounded to the nearest of its B-bit levels, the quantizer QAT's forward pass
uses: the run's widths, and its clipping method at nearest rounding ('mean_optimal' here is its
value for one copy, i.e. 'octav'; TFF's min-max runs, which do not clip, use 'max_abs').
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import tensorflow as tf

from tff_clipq.quantization import budget_payload
from tff_clipq.quantization import encoding_plan
from tff_clipq.quantization import quantizer
from tff_clipq.quantization import thresholds

DEPLOYED_ROUNDING = 'nearest'


def quantize_weights(
  weights: Sequence[np.ndarray],
  bits: encoding_plan.BitsSpec,
  clipping: Union[str, float],
  min_size_to_quantize: int,
  per_channel: bool = False,
) -> list[np.ndarray]:
  """Each tensor of `weights` clipped and rounded to nearest on its B-bit grid (small ones kept).

  Args:
    weights: the model's trainable tensors, in `model.trainable_variables` order.
    bits: one width, one per quantized tensor / per tensor, or a budget (as
      `encoding_plan.make_plan` takes).
    clipping: the threshold method ('max_abs', 'octav', 'mean_optimal', ...) or a fixed number.
    min_size_to_quantize: tensors with fewer entries stay float32, as they travel.
    per_channel: one threshold per slice of the last axis.
  """
  plan = encoding_plan.make_plan(
    [np.shape(w) for w in weights],
    bits,
    min_size_to_quantize,
    clipping,
    DEPLOYED_ROUNDING,
    per_channel,
  )
  deployed = [np.asarray(w, np.float32) for w in weights]
  if plan.budget is not None:  # Widths chosen within the budget, as a client would.
    part, _, _, _ = budget_payload.encode_tensors(
      plan, [tf.constant(w) for w in deployed], tf.zeros([2], tf.int64)
    )
    for index, value in zip(plan.quantized_indices, budget_payload.decode(plan, part)):
      deployed[index] = value.numpy()
    return deployed
  for index in plan.quantized_indices:
    encoding, value = plan.tensors[index], tf.constant(deployed[index])
    threshold = thresholds.clipping_threshold(
      value, encoding.bits, clipping, DEPLOYED_ROUNDING, per_channel
    )
    deployed[index] = quantizer.fake_quantize(
      value, encoding.bits, threshold, DEPLOYED_ROUNDING
    ).numpy()
  return deployed
