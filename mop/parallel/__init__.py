"""Parallelism: the MoP rank layout and the `parallelize()` steps that apply it to a model."""
