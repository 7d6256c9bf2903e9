"""What routes take from the app, as FastAPI dependencies: the engine built in
the lifespan, or one of its parts, and the metrics."""

from typing import Annotated

from fastapi import Depends, Request

from server.api.metrics import Metrics
from server.build import Engine
from server.fine_tuning.files import Files
from server.fine_tuning.jobs import Jobs
from server.inference import Inference
from server.tasks import TaskManager


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


def get_starting_engine(request: Request) -> Engine | None:
    """The engine, or None while the lifespan is still building it."""
    return getattr(request.app.state, "engine", None)


def get_tasks(request: Request) -> TaskManager:
    return request.app.state.engine.tasks


def get_inference(request: Request) -> Inference:
    return request.app.state.engine.inference


def get_files(request: Request) -> Files:
    return request.app.state.engine.files


def get_jobs(request: Request) -> Jobs:
    return request.app.state.engine.jobs


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


EngineDep = Annotated[Engine, Depends(get_engine)]
StartingEngineDep = Annotated[Engine | None, Depends(get_starting_engine)]
TasksDep = Annotated[TaskManager, Depends(get_tasks)]
InferenceDep = Annotated[Inference, Depends(get_inference)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
FilesDep = Annotated[Files, Depends(get_files)]
JobsDep = Annotated[Jobs, Depends(get_jobs)]
