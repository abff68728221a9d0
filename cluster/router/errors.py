"""Errors a client may see, in OpenAI's error shape; nothing else (no stack trace) ever leaves the router.

HTTP status → OpenAI error type: 400/404/413/415 invalid_request_error (404 not_found_error), 401
authentication_error, 429 rate_limit_error (with Retry-After), 503 service_unavailable (with
Retry-After). The gRPC API maps the same statuses to status codes (grpc_api.py).
"""

from __future__ import annotations

import math


class APIError(Exception):
    """An error with its HTTP status, OpenAI error type, and the request field it is about."""

    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
                 headers: dict[str, str] | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type_
        self.headers = headers or {}
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @property
    def retry_after(self) -> str | None:
        return self.headers.get("Retry-After")


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


def not_found(message: str, param: str | None = None) -> APIError:
    return APIError(404, message, param, "not_found_error")


def unauthorized(message: str) -> APIError:
    return APIError(401, message, None, "authentication_error", {"WWW-Authenticate": "Bearer"}, "invalid_api_key")


def rate_limited(message: str, retry_after_s: float) -> APIError:
    # Retry-After is whole seconds; round up so a client that obeys it finds the tokens there
    seconds = max(1, math.ceil(retry_after_s))
    return APIError(429, message, None, "rate_limit_error", {"Retry-After": str(seconds)}, "rate_limit_exceeded")


def unavailable(message: str) -> APIError:
    return APIError(503, message, None, "service_unavailable", {"Retry-After": "1"})
