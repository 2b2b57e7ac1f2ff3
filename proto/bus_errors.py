"""What the bus raises where the fabric did not do what was asked, for its callers to act on."""

from __future__ import annotations


class QueueFull(Exception):
    """The model's request queue in the GEN stream is at its limit."""


class PayloadTooLarge(Exception):
    """The message is larger than the server's max_payload."""


class BusUnavailable(Exception):
    """JetStream did not answer in time: the server is restarting or unreachable."""


class BusLost(ConnectionError):
    """The NATS connection was closed for good (not a disconnect that reconnects)."""


class EventNotStored(BusUnavailable):
    """JetStream did not confirm an event: it must not be reported as saved."""


class ArtifactMismatch(Exception):
    """An artifact is missing, or its content is not what its reference pins."""
