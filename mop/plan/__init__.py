"""`mop plan`: per-rank memory and time model of a training step, and the search that picks a configuration.

Modules:
  state        exact per-rank bytes of weights, gradients and optimizer state (the pre-flight check)
  calibration  measured constants per GPU type (kernel rates, link bandwidths, allocator slack)
  memory       peak device memory and host memory of one step, by term
  timing       step time, by term (attention, expert GEMMs, dense GEMMs, vocabulary, collectives, optimizer)
  search       `choose(...) -> Plan`: the fastest configuration that fits, runner-ups, reasons for rejections
  cli          the `mop plan` command (plan, calibrate, accuracy)
"""

from mop.plan.state import FP32, GIB, StateMemory, check_state_fits, state_memory

__all__ = ["FP32", "GIB", "StateMemory", "check_state_fits", "state_memory"]
