"""TFF aggregation factories that send clipped, quantized, bit-packed client values."""

from tff_clipq.aggregators.clipped_quantization import clipped_quantization_mean
from tff_clipq.aggregators.clipped_quantization import clipped_quantization_sum
from tff_clipq.aggregators.clipped_quantization import unweighted_clipped_quantization_mean
from tff_clipq.aggregators.clipped_quantization import WEIGHTING_ALIASES
from tff_clipq.aggregators.clipped_quantization import WEIGHTINGS
