"""Experts under MoP: hybrid expert parallelism x sharding, routed plainly, with LLEP, or pipelined.

The names below are imported on first use (PEP 562), so that reading the configuration
(`mop.parallel.experts.config`, `.registry`) loads no torch code.
"""

from importlib import import_module

_EXPORTS = {
    "AllToAllDispatcher": "dispatch", "LayerPlan": "dispatch", "LlepDispatcher": "dispatch",
    "PipelinedLlepDispatcher": "dispatch", "Route": "dispatch", "TokenDispatcher": "dispatch",
    "ExpertParallelConfig": "config", "ExpertParallelExperts": "module", "make_dispatcher": "module",
    "DISPATCHERS": "registry", "LlepPlan": "planner", "plain_plan": "planner", "plan_llep": "planner",
    "split_by_source": "planner",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
