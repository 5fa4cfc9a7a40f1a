"""OpenAI-compatible HTTP server (FastAPI + uvicorn) in front of the engine-core process.

Entry points: `lockgate.server.launch.serve(...)` (Python) and `lockgate serve` (CLI).
"""
