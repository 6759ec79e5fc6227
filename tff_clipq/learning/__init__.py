"""Models, quantization-aware training and learning-process builders."""
