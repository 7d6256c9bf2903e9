import hmac
from typing import Annotated

from fastapi import Depends, Request

from prompt_store.errors import Unauthorized

from ..engine import Engine


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


EngineDep = Annotated[Engine, Depends(get_engine)]


def _check_bearer(request: Request, expected: str | None) -> None:
    if expected is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    # compare_digest: the time taken does not reveal how much of the token matched
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise Unauthorized("this route needs an 'Authorization: Bearer <token>' header with a valid token")


def require_write_token(request: Request, engine: EngineDep) -> None:
    _check_bearer(request, engine.settings.api_token)


def require_inference_token(request: Request, engine: EngineDep) -> None:
    _check_bearer(request, engine.settings.inference_token)


WriteAccess = Depends(require_write_token)
InferenceAccess = Depends(require_inference_token)
