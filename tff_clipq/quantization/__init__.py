"""Pure-TensorFlow clipped uniform quantization: thresholds, quantizers, bit packing (no TFF)."""

from tff_clipq.quantization.packing import pack_codes
from tff_clipq.quantization.packing import packed_length
from tff_clipq.quantization.packing import unpack_codes
from tff_clipq.quantization.quantizer import dequantize
from tff_clipq.quantization.quantizer import dequantize_codes
from tff_clipq.quantization.quantizer import fake_quantize
from tff_clipq.quantization.quantizer import quantize
from tff_clipq.quantization.quantizer import quantize_and_measure
from tff_clipq.quantization.quantizer import QuantizedTensor
from tff_clipq.quantization.quantizer import ROUNDING_MODES
from tff_clipq.quantization.thresholds import CLIPPING_METHODS
from tff_clipq.quantization.thresholds import clipping_threshold
from tff_clipq.quantization.thresholds import clipping_thresholds
from tff_clipq.quantization.thresholds import expected_quantization_mse
from tff_clipq.quantization.thresholds import max_abs_threshold
from tff_clipq.quantization.thresholds import noise_coefficient
from tff_clipq.quantization.thresholds import octav_fixed_point_threshold
from tff_clipq.quantization.thresholds import optimal_clipping_threshold
from tff_clipq.quantization.thresholds import optimal_clipping_thresholds
