"""edgecells.convert: host-side int8 quantization, validation and model bundles."""
