"""The bundled paged-attention serving engine.

It runs on every replica the broker launches. It imports `kernels` and torch, never `skybroker`.
"""

__version__ = "0.1.0"
