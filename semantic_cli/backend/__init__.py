"""Everything that touches MLX or mlx-lm below their public API: the lazy `mlx` import and BLAS set-up,
uninitialised buffers, the native restore loops, split matmuls, and mlx-lm internals (compat).

Lifting the mlx-lm version pin means auditing this package and nothing else."""
