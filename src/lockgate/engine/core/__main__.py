"""`python -m lockgate.engine.core --input ADDR --output ADDR --config JSON [--kv-events ADDR
--kv-replay ADDR]`: one engine core; or `--bind HOST --addresses-fd FD --config JSON`: one that
binds its sockets on TCP as CurveZMQ servers (keys in `$LOCKGATE_CURVE_SERVER`, never on the
command line), for an API process on another machine.

The API process starts it the first way (`frontend/transport.py`), a Ray actor the second
(`lifecycle/ray_replica.py`); operators and tests find engine cores by that command line. The
loop itself is in `proc.py`.
"""
from __future__ import annotations

import sys

from lockgate.engine.core.proc import main

if __name__ == "__main__":
    sys.exit(main())
