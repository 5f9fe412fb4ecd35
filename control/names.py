"""Task names: stable strings that the beat schedule and the workers agree on."""


class TaskNames:
    DISPATCH = "inferq.webhooks.dispatch"
    DELIVER = "inferq.webhooks.deliver"
    HANDOFF = "inferq.webhooks.handoff"  # rows just committed: claim and deliver them now
    SWEEP = "inferq.sweeps.run"
