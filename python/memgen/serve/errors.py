"""Errors in OpenAI's schema: {"error": {"message", "type", "param", "code"}}."""
from __future__ import annotations

from fastapi.responses import JSONResponse


class APIError(Exception):
    """An error the server answers with OpenAI's error body (and never a traceback)."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def model_not_found(name: str, served: str) -> APIError:
    return APIError(404, f"The model `{name}` does not exist; this server serves `{served}`",
                    "invalid_request_error", "model", "model_not_found")


def overloaded(num_waiting: int, limit: int, retry_after_s: int = 1) -> APIError:
    return APIError(503, f"the server is overloaded: {num_waiting} sequences are waiting (limit {limit}); "
                         f"retry after {retry_after_s} s", "server_error", None, "server_overloaded",
                    headers={"Retry-After": str(retry_after_s)})


def internal(message: str) -> APIError:
    return APIError(500, message, "server_error", None, "internal_error")


def shutting_down(retry_after_s: int = 1) -> APIError:
    """503 + Retry-After: the server is draining (SIGTERM) and takes no new requests, or
    its grace period ended before the request did; another replica can serve it."""
    return APIError(503, "the server is shutting down; retry on another replica", "server_error", None,
                    "server_shutting_down", headers={"Retry-After": str(retry_after_s)})
