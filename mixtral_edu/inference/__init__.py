"""Running the model: generation, the fast decoder, placement on GPUs, int8, offloading, layer splits,
the Triton kernel and the CPU defaults (lm_head layout, threads). None of it re-implements the model: each is a way
to store or place its weights, or to call its one forward."""
