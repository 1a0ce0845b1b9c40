"""Service discovery: two "model server" instances register with HTTP health
checks, the maintainer's pass checks them, discover() returns the healthy one,
and a watch sees every change. Run: python examples/registry.py

In a deployment the checks run in the elected maintainer (a running
``taskspace worker``); here the example calls the maintainer's step itself.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from taskspace import Space
from taskspace.coordination.registry import maintain_registry


class Health(BaseHTTPRequestHandler):
    healthy = True  # the first server says 200, the second 500

    def do_GET(self) -> None:
        self.send_response(200 if self.server.healthy else 500)  # type: ignore[attr-defined]
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def serve(healthy: bool) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    server.healthy = healthy  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


space = Space("sqlite:///.taskspace/registry-example.db")
registry = space.registry
good, bad = serve(True), serve(False)

# Follow the service from now on: added, updated (health), removed, expired.
changes = registry.watch("model", idle_timeout=1.0)

for name, server in (("gpu-a", good), ("gpu-b", bad)):
    port = server.server_address[1]
    registry.register(
        "model", name, f"127.0.0.1:{port}", tags=["gpu"], meta={"model": "small"},
        check=f"http://127.0.0.1:{port}/health", interval=0.2, timeout=1.0, ttl=5.0,
    )  # fmt: skip

# Checks start critical ("not checked yet"); a maintainer pass or two settles them.
deadline = time.monotonic() + 10
while len(registry.discover("model", healthy_only=False)) != 2 or any(
    i.checked is None for i in registry.discover("model", healthy_only=False)
):
    maintain_registry(space)
    assert time.monotonic() < deadline, "checks did not run"

healthy = registry.discover("model", tags=["gpu"])
print("healthy:", [(i.id, i.address) for i in healthy])
assert [i.id for i in healthy] == ["gpu-a"]
print("all:", [(i.id, i.status, i.output) for i in registry.discover("model", healthy_only=False)])

registry.deregister("model", "gpu-b")
registry.close()  # deregisters what this process registered (gpu-a)

seen = [(c.kind, c.id, c.instance.status if c.instance else None) for c in changes]
for change in seen:
    print("change:", *change)
assert ("added", "gpu-a", "critical") in seen and ("updated", "gpu-a", "passing") in seen
assert seen[-2:] == [("removed", "gpu-b", "critical"), ("removed", "gpu-a", "passing")]
good.shutdown()
bad.shutdown()
