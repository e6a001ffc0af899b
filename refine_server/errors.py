"""OpenAI's error format: every failure a client sees is `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from refine_server.policies.base import PolicyError

log = logging.getLogger(__name__)

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


class APIError(Exception):
    """An error that reaches the client as OpenAI error JSON with the given HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers  # response headers that go with the error (Retry-After, say)

    def body(self) -> dict[str, Any]:
        kind = _TYPE_BY_STATUS.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def invalid_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param, code="invalid_request")


def from_policy_error(exc: PolicyError) -> APIError:
    """A request the chosen policy cannot serve (400), or a policy this server cannot run now (503)."""
    return APIError(exc.status, exc.message, param=exc.param, code=exc.code)


def from_validation_error(exc: ValidationError, prefix: tuple[str | int, ...] = ()) -> APIError:
    """The first problem pydantic found, with the field named the way a client wrote it (`refine.max_steps`)."""
    first = exc.errors()[0]
    loc = prefix + tuple(first["loc"])
    param = ".".join(str(p) for p in loc) or None
    return invalid_request(f"{param}: {first['msg']}" if param else first["msg"], param)


def install_handlers(app: FastAPI) -> None:
    """Make every error path answer in OpenAI's format, including Starlette's own 404/405."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = APIError(exc.status_code, str(exc.detail))
        return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        err = APIError(500, "internal server error", code="internal_error")
        return JSONResponse(err.body(), status_code=500)
