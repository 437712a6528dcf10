"""The benchmark (``make bench``): real processes on loopback, measured against raw transports.

``python -m tests.bench`` runs every scenario; the helper processes it starts live in
the sibling modules and are run with ``python -m tests.bench.<module>``.
"""

import os

# The bench forks children while its gRPC channels are open; gRPC's fork handlers would
# only log that they skip (the children exec at once), so they are not installed.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
