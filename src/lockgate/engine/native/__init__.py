"""Native CPU kernels: the C source, its once-per-machine build, and the layers that call it."""
