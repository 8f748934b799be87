"""Number formats, quantization plans, PTQ calibration and the fake-quantized student."""
