"""Hot-path kernels for the engine: Triton kernels for CUDA and plain-torch references.

Imports torch and triton only; never the engine or the broker.
"""
