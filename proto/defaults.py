"""Where the gateway listens unless told otherwise, and how its clients (the arena, the judge,
the benchmark) find it: one definition for every component."""

from __future__ import annotations

import os

GATEWAY_PORT = 8000
DEFAULT_GATEWAY_URL = f"http://127.0.0.1:{GATEWAY_PORT}/v1"
GATEWAY_URL_ENV = "CHATFABRIC_GATEWAY_URL"


def gateway_url() -> str:
    """The gateway's OpenAI API for a client: $CHATFABRIC_GATEWAY_URL, else the local default."""
    return os.environ.get(GATEWAY_URL_ENV) or DEFAULT_GATEWAY_URL
