"""The HTTP API, the dashboard and the Prometheus metrics served by ``taskspace serve``."""
