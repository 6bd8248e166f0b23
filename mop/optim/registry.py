"""`ENGINES`: the one list of HostAdamW update engines, by the name `HostAdamW(engine=...)` takes.

Each entry names its `UpdateEngine` class as "module:Class", imported only when used. HostAdamW's
factory, the configuration's `optimizer.offload` check and the host-AdamW benchmark all read this
table; a new engine is its own file plus one line here.
"""

from __future__ import annotations

from importlib import import_module

ENGINES: dict[str, str] = {
    "cpu": "mop.optim.update_engines:CpuEngine",
    "gpu_stream": "mop.optim.update_engines:GpuStreamEngine",
    "device": "mop.optim.update_engines:DeviceEngine",
}


def engine_class(name: str) -> type:
    """The `UpdateEngine` subclass registered as `name`."""
    if name not in ENGINES:
        raise ValueError(f"engine={name!r}: expected one of {tuple(ENGINES)}")
    module, cls = ENGINES[name].split(":")
    return getattr(import_module(module), cls)


def offload_choices(host_only: bool = False) -> tuple[str, ...]:
    """Values of `optimizer.offload`: "none" (torch AdamW on the device) and every engine that keeps
    state in host memory; `host_only` (a CPU run, whose "device" is host memory too) leaves out the
    engines that stage state on the device, which there would only copy host memory to host memory."""
    engines = (engine_class(n) for n in ENGINES)
    return ("none",) + tuple(n for n, cls in zip(ENGINES, engines)
                             if not cls.device_resident and not (host_only and cls.stages_on_device))
