"""Errors shaped as the OpenAI API's: ``{"error": {"message", "type", "param", "code"}}``.

Every failure a client can cause becomes an :class:`ApiError` with an HTTP status and one line of
message; :func:`install_handlers` turns FastAPI's own errors (a bad path, a wrong method, a request
that fails validation) and anything unexpected into the same shape, so that no response ever carries
a traceback. Unexpected errors are logged on the server (with their traceback) and answered with a
plain 500 error object.

Example:
    >>> error_body(ApiError(404, "no model 'x'", code="model_not_found", param="model"))["error"]["type"]
    'invalid_request_error'
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI, Request
    from starlette.responses import Response

__all__ = ["ApiError", "error_body", "error_response", "install_handlers", "validation_message"]

logger = logging.getLogger("fusekit.serve")

_TYPES: dict[int, str] = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                          404: "invalid_request_error", 405: "invalid_request_error",
                          413: "invalid_request_error", 415: "invalid_request_error",
                          422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
                          503: "server_error"}


class ApiError(Exception):
    """A request the server refuses, with the HTTP status and the fields of OpenAI's error object.

    Attributes:
        status: the HTTP status code.
        message: one line saying what was wrong and how to fix it.
        type: OpenAI's error type (``invalid_request_error``, ``authentication_error``, ...); by
            default derived from the status.
        param: the request field at fault, or None.
        code: a short machine-readable code (``model_not_found``, ``invalid_api_key``), or None.
        headers: extra response headers (``Retry-After`` for 429).
    """

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.param = param
        self.code = code
        self.headers = headers or {}


def error_body(error: ApiError) -> dict[str, Any]:
    """The JSON body OpenAI's API answers an error with."""
    return {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}


def error_response(error: ApiError) -> Response:
    """A JSON response for ``error``, with its status and headers."""
    from starlette.responses import JSONResponse

    return JSONResponse(error_body(error), status_code=error.status, headers=error.headers)


def validation_message(errors: Sequence[Mapping[str, Any]]) -> tuple[str, str | None]:
    """One line and the field at fault from pydantic's validation errors (the first error names both).

    Args:
        errors: ``ValidationError.errors()`` (or FastAPI's ``RequestValidationError.errors()``).

    Returns:
        ``("temperature: Input should be a finite number, got nan", "temperature")`` and the like.
    """
    if not errors:
        return "the request body is not valid", None
    fields = [_field_path(error.get("loc", ())) for error in errors]
    param = ".".join(fields[0]) or None
    alike = [e for e, f in zip(errors, fields, strict=True) if f == fields[0]]
    reasons = list(dict.fromkeys(_reason(e) for e in alike))
    message = " or ".join([reasons[0], *(r.removeprefix("Input should be ") for r in reasons[1:])])
    first = alike[0]
    if param is None:  # a check across fields names the field it is about: "top_logprobs: needs ..."
        named = re.match(r"^([a-z_]+): ", message)
        return message, named[1] if named else None
    if first.get("type") not in _NO_INPUT and "input" in first:
        message += f", got {_short(first['input'])}"
    text = f"{param}: {message}"
    others = len({tuple(f) for f in fields}) - 1
    if others:
        text += f" (and {others} more problem{'s' if others > 1 else ''})"
    return text, param


def _field_path(loc: Sequence[Any]) -> list[str]:
    """The request field a pydantic location names, without ``body`` and union member tags
    (``prompt.str`` and ``prompt.list[str].0`` are both ``prompt``)."""
    path: list[str] = []
    for part in loc:
        if part == "body" and not path:
            continue
        if isinstance(part, str) and (part in _TAGS or "[" in part):
            break
        path.append(str(part))
    return path


_NO_INPUT = frozenset({"extra_forbidden", "missing", "json_invalid", "value_error"})
_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _reason(error: Mapping[str, Any]) -> str:
    kind = error.get("type")
    if kind == "extra_forbidden":
        return "unknown field; remove it"
    if kind == "missing":
        return "field required"
    return str(error.get("msg", "invalid value")).replace("Value error, ", "")


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def install_handlers(app: FastAPI) -> None:
    """Answer every error the app meets with OpenAI's error object, never with a traceback.

    Args:
        app: the FastAPI application.
    """
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return error_response(exc)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        status = exc.status_code
        message = {404: f"no route {request.url.path}; this server answers /v1/models, /v1/completions, "
                        "/v1/chat/completions, /health and /metrics",
                   405: f"method {request.method} is not allowed on {request.url.path}"
                   }.get(status, str(exc.detail))
        return error_response(ApiError(status, message, headers=dict(exc.headers or {})))

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        message, param = validation_message(list(exc.errors()))
        return error_response(ApiError(400, message, param=param))

    async def on_anything(request: Request, exc: Exception) -> Response:
        logger.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(ApiError(500, "internal server error; the server log has the details"))

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Exception, on_anything)
