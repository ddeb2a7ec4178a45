"""`sleigh serve`: an OpenAI-compatible chat-completions server on the torch-free runtime
(`pip install 'sleigh[serve]'`), and its Ray Serve deployment for more replicas.

Modules: protocol (requests, errors, responses), worker (one Pipeline, one generation at a time),
metrics (Prometheus text), app (the FastAPI app), ray_app (Ray Serve).
"""
