"""Errors shaped like OCI's: an HTTP status, a service error code and a message."""

from __future__ import annotations


class ServiceError(Exception):
    """An error the local OCI answers with, rendered as ``{"code": ..., "message": ...}``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


def invalid_parameter(message: str) -> ServiceError:
    return ServiceError(400, "InvalidParameter", message)


def missing_parameter(name: str) -> ServiceError:
    return ServiceError(400, "MissingParameter", f"Missing required parameter: {name}")


def not_found(what: str) -> ServiceError:
    return ServiceError(
        404,
        "NotAuthorizedOrNotFound",
        f"{what} not found or you are not authorized to access it.",
    )


def conflict(message: str) -> ServiceError:
    return ServiceError(409, "Conflict", message)


def incorrect_state(message: str) -> ServiceError:
    return ServiceError(409, "IncorrectState", message)


def precondition_failed(message: str) -> ServiceError:
    return ServiceError(412, "PreconditionFailed", message)


def not_authenticated(message: str) -> ServiceError:
    return ServiceError(401, "NotAuthenticated", message)
