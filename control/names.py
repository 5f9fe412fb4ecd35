"""Task names: stable strings that the beat schedule and the workers agree on."""


class TaskNames:
    DISPATCH = "inferq.webhooks.dispatch"
    DELIVER = "inferq.webhooks.deliver"
    SWEEP = "inferq.sweeps.run"
