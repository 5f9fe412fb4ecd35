"""The control plane: the Celery app, its tasks (webhook dispatch and delivery) and the
periodic sweeps (expiry, stale-lease requeue, retention). ``inferq control`` runs it."""
