"""The one error envelope of the HTTP edge: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import json

from aiohttp import web
from pydantic import ValidationError


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        headers = {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, round(self.retry_after)))
        return web.Response(
            status=self.status,
            text=json.dumps(self.body()),
            content_type="application/json",
            headers=headers,
        )


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def from_validation(err: ValidationError, renames: dict[str, str] | None = None) -> APIError:
    """The first problem of a pydantic validation error, as a 400 naming the field (`renames`
    maps a field name to the one the client actually sent)."""
    first = err.errors(include_url=False)[0]
    loc = [str(p) for p in first["loc"] if not str(p).startswith("function-")]
    if loc and renames and loc[0] in renames:
        loc[0] = renames[loc[0]]
    param = ".".join(loc) or None
    message = first["msg"]
    if first["type"] == "missing":
        message = f"'{param}' is a required property"
    elif param:
        message = f"Invalid value for '{param}': {message}"
    return invalid(message, param=param)
