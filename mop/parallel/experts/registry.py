"""`DISPATCHERS`: the one list of token dispatchers, by the name `parallel.experts.dispatcher` takes.

Each entry names its class as "module:Class" and is imported only when used, so validating a
configuration imports no dispatcher code. The configuration, `ExpertParallelExperts` and the
expert-layer benchmark all read this table; a new dispatcher is its own file plus one line here.
"""

from __future__ import annotations

from importlib import import_module

DISPATCHERS: dict[str, str] = {
    "alltoall": "mop.parallel.experts.dispatch:AllToAllDispatcher",
    "llep": "mop.parallel.experts.dispatch:LlepDispatcher",
    "llep_pipelined": "mop.parallel.experts.dispatch:PipelinedLlepDispatcher",
}


def check_dispatcher(name: str, option: str = "parallel.experts.dispatcher") -> None:
    """ValueError naming `option` and the valid names unless `name` is a registered dispatcher."""
    if name not in DISPATCHERS:
        raise ValueError(f"{option}: {name!r} is not one of {', '.join(repr(n) for n in DISPATCHERS)}")


def dispatcher_class(name: str) -> type:
    """The `TokenDispatcher` subclass registered as `name`."""
    check_dispatcher(name)
    module, cls = DISPATCHERS[name].split(":")
    return getattr(import_module(module), cls)
