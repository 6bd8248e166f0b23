"""Every benchmark of mop, apart from the library it measures.

* `mop bench` (`cli`, `runner`, `worker`, `report`, `sweep`): mop and the FSDP-best baseline side by
  side, end to end, the baseline's configuration swept.
* Micro-benchmarks, GPU only, each `python -m mop.bench.NAME --help`: `experts` (the expert layer
  under each dispatcher), `vocab` (the vocabulary loss), `host_adamw` (the host optimizer engines).
"""
