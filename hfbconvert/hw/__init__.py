"""Accelerator model: per-layer cycles, utilization and energy (compute / on-chip memory /
DRAM) of an original model on a MAC-array baseline and of a hybrid on an area-equivalent
MAC + adder design, computed with ZigZag (zigzag-dse). See docs/hardware.md."""

from .spec import Design, load_design, shipped  # noqa: F401
