"""Quality evaluation of a model (or a precision of it) against another: `lockgate eval`."""
