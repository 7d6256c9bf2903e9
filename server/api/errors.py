"""Errors of HTTP alone: tokens and headers. The rest are in ptcore/errors.py."""

from ptcore.errors import PtserveError


class Unauthorized(PtserveError):
    """A missing or wrong bearer token."""


class Forbidden(PtserveError):
    """A valid token, but not one that allows this route."""


class BadRequest(PtserveError):
    """A request that cannot be read one way only (e.g. two Authorization headers)."""
