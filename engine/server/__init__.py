"""OpenAI-compatible HTTP server for the engine (`python -m engine.serve`)."""
