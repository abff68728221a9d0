"""Errors a client may see, in OpenAI's error shape; nothing else (no stack trace) ever leaves the router."""

from __future__ import annotations


class APIError(Exception):
    """An error with its HTTP status, OpenAI error type, and the request field it is about."""

    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type_
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": None}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


def not_found(message: str, param: str | None = None) -> APIError:
    return APIError(404, message, param, "not_found_error")


def unavailable(message: str) -> APIError:
    return APIError(503, message, None, "service_unavailable", {"Retry-After": "1"})
