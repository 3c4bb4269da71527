"""hfbconvert: per-layer hybrid ternary filter banks for pretrained MobileNets.

The library API is usable without the CLI; each stage is a plain function:
load -> calibrate -> sensitivity -> plan -> build/fit -> finetune -> export -> report.
"""

__version__ = "0.1.0"
