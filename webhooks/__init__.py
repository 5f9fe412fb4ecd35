"""Webhooks: Standard Webhooks signing, delivery with its retry schedule, the SSRF guard, and
the routes that show and replay a job's deliveries. The outbox rows themselves live in
``jobstore.outbox``: they are written in the job's own transaction."""
