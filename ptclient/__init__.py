"""A Python client for the ptserve REST API."""

from ptclient.client import ClientError, PtserveClient

__all__ = ["ClientError", "PtserveClient"]
