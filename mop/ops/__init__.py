"""Device kernels and small pure-tensor helpers shared by the model and the parallel paths."""
