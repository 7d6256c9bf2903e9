from typing import Annotated

from fastapi import Depends, Request

from server.service import Engine


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


EngineDep = Annotated[Engine, Depends(get_engine)]
