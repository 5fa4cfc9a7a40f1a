"""Structured outputs: grammar-constrained decoding with llguidance.

`grammar.py` turns a request's `StructuredOutputs` into an llguidance grammar and
validates it (the frontend, before submitting); the core side builds the
llguidance tokenizer once (`tokenizer.py`), compiles grammars on a worker thread
(`compiler.py`) into a bounded LRU cache (`cache.py`), keeps one matcher per
request (`matcher.py`) and fills each step's token bitmasks (`decoding.py`); the
sampler applies them to the constrained rows only.
"""
