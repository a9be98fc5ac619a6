"""Domain errors raised by services; the API turns each kind into its status code."""


class ServiceError(Exception):
    """A request that cannot be carried out; `detail` is shown to the caller."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class InvalidInputError(ServiceError):
    """The input is malformed or inconsistent (400)."""


class PermissionDeniedError(ServiceError):
    """The caller may not do this (403)."""


class NotFoundError(ServiceError):
    """The object does not exist (404)."""


class ConflictError(ServiceError):
    """Wrong state, wrong round or a duplicate (409)."""


class TooLargeError(ServiceError):
    """The upload exceeds the configured limit (413)."""
