"""Experts under MoP: hybrid expert parallelism x sharding, routed plainly, with LLEP, or pipelined."""

from mop.parallel.experts.dispatch import (AllToAllDispatcher, LayerPlan, LlepDispatcher, PipelinedLlepDispatcher,
                                           Route, TokenDispatcher)
from mop.parallel.experts.module import ExpertParallelConfig, ExpertParallelExperts, make_dispatcher
from mop.parallel.experts.registry import DISPATCHERS
from mop.parallel.experts.planner import LlepPlan, plain_plan, plan_llep, split_by_source

__all__ = [
    "AllToAllDispatcher", "DISPATCHERS", "ExpertParallelConfig", "ExpertParallelExperts", "LayerPlan",
    "LlepDispatcher", "LlepPlan", "PipelinedLlepDispatcher", "Route", "TokenDispatcher", "make_dispatcher",
    "plain_plan", "plan_llep", "split_by_source",
]
