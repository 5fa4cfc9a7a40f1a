"""`python -m lockgate.engine.core --input ADDR --output ADDR --config JSON [--kv-events ADDR
--kv-replay ADDR]`: one engine core.

The API process starts it this way (`frontend/transport.py`); operators and tests
find engine cores by that command line. The loop itself is in `proc.py`.
"""
from __future__ import annotations

import sys

from lockgate.engine.core.proc import main

if __name__ == "__main__":
    sys.exit(main())
