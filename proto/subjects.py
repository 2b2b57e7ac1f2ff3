"""Subject, stream, consumer and bucket names, and the reversible model-name mapping.

NATS subject tokens cannot hold '.', '*', '>' or whitespace, and consumer names cannot hold '/'
either. A model name is mapped to a token made only of [A-Za-z0-9_-] by escaping every other
byte of its UTF-8 form as '=XX' (hex); '=' itself is escaped, so the mapping is reversible.
"""

from __future__ import annotations

import re

GEN_STREAM = "GEN"
GEN_PREFIX = "gen"
CANCEL_PREFIX = "ctl.cancel"
REGISTRY_BUCKET = "workers"
INBOX_PREFIX = "_INBOX.cf"

_SAFE = re.compile(rb"[A-Za-z0-9_-]")
_TOKEN = re.compile(r"^(?:[A-Za-z0-9_-]|=[0-9A-F]{2})+$")


def model_token(model: str) -> str:
    """Map a model name to a subject token (reversible, see `model_from_token`)."""
    if not model:
        raise ValueError("model name must not be empty")
    out = []
    for byte in model.encode("utf-8"):
        char = bytes([byte])
        out.append(char.decode() if _SAFE.match(char) else f"={byte:02X}")
    return "".join(out)


def model_from_token(token: str) -> str:
    """Inverse of `model_token`; raises ValueError on a string it could not have produced."""
    if not _TOKEN.match(token):
        raise ValueError(f"not a model token: {token!r}")
    raw = bytearray()
    i = 0
    while i < len(token):
        if token[i] == "=":
            raw.append(int(token[i + 1 : i + 3], 16))
            i += 3
        else:
            raw.append(ord(token[i]))
            i += 1
    return raw.decode("utf-8")


def gen_subject(model: str) -> str:
    """The request subject of one model in the GEN stream."""
    return f"{GEN_PREFIX}.{model_token(model)}"


def gen_consumer(model: str) -> str:
    """The durable pull consumer shared by every worker of one model."""
    return f"gen-{model_token(model)}"


def cancel_subject(request_id: str) -> str:
    return f"{CANCEL_PREFIX}.{request_id}"


def cancel_wildcard() -> str:
    return f"{CANCEL_PREFIX}.*"


def reply_prefix(gateway_id: str) -> str:
    """Every reply inbox of one gateway lives under this prefix (one subscription for all)."""
    return f"{INBOX_PREFIX}.{gateway_id}"


def reply_inbox(gateway_id: str, request_id: str) -> str:
    return f"{reply_prefix(gateway_id)}.{request_id}"
