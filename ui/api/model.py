"""The API's observer of the shared model guard: every guarded call, whichever surface made it
(the API's routes, the chat mounted at /ui), lands in the API's Prometheus metrics.

The model itself (background loading, the guard) is `agent.app`'s: `Runtime.model()` hands it out
already guarded and `agent.app.model_holder.ModelHolder` loads it in the background.
"""

from __future__ import annotations

from agent.llm.base import Usage
from agent.llm.wrappers import Lane
from ui.api.metrics import Metrics


class MetricsObserver:
    """Feeds the shared guard's call events into the API's Prometheus metrics."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def call_started(self, lane: Lane) -> None:
        self.metrics.model_in_flight.inc()

    def call_finished(self, lane: Lane, outcome: str, seconds: float, usage: Usage | None) -> None:
        self.metrics.model_in_flight.dec()
        self.metrics.model_latency.labels(outcome).observe(seconds)
        if usage is not None:
            self.metrics.model_tokens.labels("prompt").inc(usage.prompt_tokens)
            self.metrics.model_tokens.labels("completion").inc(usage.completion_tokens)
