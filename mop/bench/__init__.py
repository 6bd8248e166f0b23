"""`mop bench`: mop and the FSDP-best baseline side by side (see mop.bench.cli)."""
