"""Quantization rules in one place: pure primitives (:mod:`.primitives`) and range
calibrators (:mod:`.calibrators`). ``actquant`` (uint8 activations) and ``weightquant``
(int8 weights) are built on them."""
