"""The inference engine: `frontend/` runs in the API process, `core/` in the engine-core process,
the modules here are shared by both (and the offline `LLM`, both sides in one process)."""
