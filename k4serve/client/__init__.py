"""gRPC client of a k4serve server (`client.py`, needs the `serve` extra) and `k4serve request` (`cli.py`)."""

DEFAULT_URL = "127.0.0.1:8001"
