"""What every route of the API reaches through ``State``: the app's dependencies and the
parts ``create_app`` built from them. One per app, on ``app.state``; no global state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

from producers.backpressure import BacklogMonitor
from producers.metrics import ApiMetrics
from producers.publish import JobPublisher
from producers.submission import SubmissionService
from producers.waiters import WaiterHub

if TYPE_CHECKING:
    from producers.app import ApiDeps


@dataclass
class ApiState:
    deps: ApiDeps
    publisher: JobPublisher
    metrics: ApiMetrics
    backlog: BacklogMonitor
    submissions: SubmissionService
    waiters: WaiterHub


def api_state(request: Request) -> ApiState:
    state: ApiState = request.app.state.inferq
    return state


State = Annotated[ApiState, Depends(api_state)]
