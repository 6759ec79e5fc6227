"""Pure-TensorFlow clipped uniform quantization: thresholds, quantizers, bit packing (no TFF)."""
