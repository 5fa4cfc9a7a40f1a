"""The engine's API-process side: input and output processing, the async client, the
transport to the engine-core process, its supervisor, and per-request streams."""
