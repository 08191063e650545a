"""skybroker: a sky-computing broker for LLM inference.

The broker package. It plans (spec -> perf model -> ILP), provisions and routes; it never
imports torch, the serving engine or cloud SDKs at import time, so the CLI starts fast.
"""

__version__ = "0.1.0"
