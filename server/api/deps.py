"""What routes take from the app: the engine built in the lifespan, or one of its parts."""

from typing import Annotated

from fastapi import Depends, Request

from server.build import Engine
from server.inference import Inference
from server.tasks import TaskManager


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


def get_tasks(request: Request) -> TaskManager:
    return request.app.state.engine.tasks


def get_inference(request: Request) -> Inference:
    return request.app.state.engine.inference


EngineDep = Annotated[Engine, Depends(get_engine)]
TasksDep = Annotated[TaskManager, Depends(get_tasks)]
InferenceDep = Annotated[Inference, Depends(get_inference)]
