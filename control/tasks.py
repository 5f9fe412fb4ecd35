"""Celery tasks of the control plane, registered on an app by ``register``.

- ``dispatch`` (beat, every ``dispatch_interval_s``): claim due outbox rows (new, retry due,
  or a lapsed claim whose task was lost) and fan them out to ``deliver`` tasks;
- ``deliver``: one HTTP attempt for one claimed row, recorded whatever happens;
- ``handoff``: rows a role committed a moment ago (control/handoff.py sends their ids):
  claim those still unclaimed and deliver them in the same task, without waiting for a tick;
- ``sweeps`` (beat): expiry, stale-lease requeue, retention purge.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from control import sweeps
from control.names import TaskNames
from control.runtime import ControlRuntime
from jobstore.outbox import Claimed

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger(__name__)

_MAX_ROUNDS = 10  # claim rounds per dispatch tick, so one tick cannot run forever


def register(app: Celery, runtime: ControlRuntime) -> None:
    config = runtime.config

    @app.task(name=TaskNames.DELIVER, ignore_result=True)
    def deliver(delivery_id: str, token: str) -> str | None:
        outcome = runtime.deliverer.deliver(Claimed(delivery_id, token))
        return None if outcome is None else outcome.value

    @app.task(name=TaskNames.HANDOFF, ignore_result=True)
    def handoff(delivery_ids: list[str]) -> int:
        # a lost or late message costs only time: the rows wait for the dispatch sweep
        claimed = runtime.outbox.claim_ids(delivery_ids, lease_s=config.lease_s)
        for claim in claimed:
            runtime.deliverer.deliver(claim)
        return len(claimed)

    @app.task(name=TaskNames.DISPATCH, ignore_result=True)
    def dispatch() -> int:
        outbox = runtime.outbox
        sent = 0
        for _ in range(_MAX_ROUNDS):
            claimed = outbox.claim_due(limit=config.dispatch_batch, lease_s=config.lease_s)
            for claim in claimed:
                deliver.apply_async((claim.id, claim.token), expires=config.lease_s)
            sent += len(claimed)
            if len(claimed) < config.dispatch_batch:
                break
        return sent

    @app.task(name=TaskNames.SWEEP, ignore_result=True)
    def sweep() -> dict[str, Any]:
        report = sweeps.run_all(
            runtime.store,
            config.republish,
            max_attempts=config.job_max_attempts,
            retention_s=config.result_retention_s,
        )
        if any(vars(report).values()):
            log.info("sweep: %s", report)
        return vars(report)
