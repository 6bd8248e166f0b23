"""`mop plan`: per-rank memory and time model of a training step, and the search that picks a configuration.

Modules:
  step         `Step` (the options of one training step that matter) and `Cluster` (the machines)
  state        exact per-rank bytes of weights, gradients and optimizer state (the pre-flight check)
  calibration  measured constants per GPU type (kernel rates, link bandwidths, allocator slack) and the
               in-step efficiency of each term (what a training step gets of a micro-benchmark's rate)
  memory       peak device memory and host memory of one step, by term
  timing       step time, by term (attention, expert GEMMs, dense GEMMs, vocabulary, collectives, optimizer)
  search       `choose(...) -> Plan`: the fastest configuration that fits, runner-ups, reasons for rejections
  cli          the `mop plan` command (plan, calibrate, fit, accuracy, explain)
  accuracy     predicted against measured, from bench results
  fit          `mop plan fit`: the in-step efficiencies fitted to measured steps, with leave-one-out errors
  microbench   the micro-benchmarks behind `mop plan calibrate`

Python API (what `parallel.plan = "auto"` in `mop train` / `mop bench` uses):

    from mop.plan import choose, plan_for_job
    plan = choose(model_cfg, gpus=16, context=131072, gpus_per_node=8)   # raises NoPlan with numbers
    plan.best.step.overrides()      # the mop train options; plan.best.memory / .time: the terms
    plan_for_job(job, world)        # the same from a JobConfig (its model, context, tokens per step)
    check_step_fits(job, world, device_bytes)   # pre-flight of a whole step, activations included

Constants: `for_device(torch.cuda.get_device_name())` picks the shipped calibration of that GPU
type (H200 by default); `Calibration.load(path)` one written by `mop plan calibrate`.
"""

from mop.plan.calibration import Calibration, for_device
from mop.plan.memory import MemoryEstimate, estimate_memory
from mop.plan.search import Candidate, NoPlan, Plan, check_step_fits, choose, plan_for_job
from mop.plan.state import FP32, GIB, StateMemory, check_state_fits, state_memory
from mop.plan.step import Cluster, Step, step_from_overrides
from mop.plan.timing import TimeEstimate, estimate_time

__all__ = ["FP32", "GIB", "Calibration", "Candidate", "Cluster", "MemoryEstimate", "NoPlan", "Plan", "StateMemory",
           "Step", "TimeEstimate", "check_state_fits", "check_step_fits", "choose", "estimate_memory",
           "estimate_time", "for_device", "plan_for_job", "state_memory", "step_from_overrides"]
