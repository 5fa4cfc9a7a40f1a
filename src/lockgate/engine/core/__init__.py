"""The engine-core process's side: the process loop, `EngineCore`, scheduler, KV cache,
runner and sampler. `python -m lockgate.engine.core` starts one (`__main__.py`)."""
