"""Prometheus metrics, one registry per app (so tests can run several apps in one process)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("shoplens_http_requests_total", "HTTP requests by route template and status",
                                ["method", "route", "status"], registry=r)
        self.latency = Histogram("shoplens_http_request_duration_seconds", "HTTP request latency (s)",
                                 ["method", "route", "status"], buckets=_LATENCY_BUCKETS, registry=r)
        self.model_latency = Histogram("shoplens_model_call_duration_seconds",
                                       "one model call, retries included (s)", ["outcome"],
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.model_tokens = Counter("shoplens_model_tokens_total", "model tokens", ["kind"], registry=r)
        self.degraded = Counter("shoplens_degraded_answers_total",
                                "answers made without (part of) the model", ["route"], registry=r)
        self.salvaged = Counter("shoplens_salvaged_replies_total",
                                "model replies accepted after a lenient JSON parse instead of a repair round "
                                "(meta.salvaged of the answers served)", ["route"], registry=r)
        self.model_in_flight = Gauge("shoplens_model_calls_in_flight", "model calls running or waiting",
                                     registry=r)
        # set by the app to read ModelHolder.restarts at scrape time (a gauge: counted in the holder)
        self.model_restarts = Gauge("shoplens_model_server_restarts", "times the embedded model server died "
                                    "and was started again since this process started", registry=r)
        self.events_ingested = Counter("shoplens_events_ingested_total", "events by ingest outcome",
                                       ["outcome"], registry=r)
        self.chat_turns = Counter("shoplens_chat_turns_total", "chat turns at /ui by tool, outcome and who "
                                  "wrote the answer", ["tool", "outcome", "answer_source"], registry=r)
        self.chat_latency = Histogram("shoplens_chat_turn_duration_seconds", "one chat turn, question to done (s)",
                                      ["tool"], buckets=_LATENCY_BUCKETS, registry=r)
        self.chat_sentences = Counter("shoplens_chat_sentences_total", "model-written chat sentences by what "
                                      "the verifier did", ["verdict"], registry=r)
        self.feedback = Counter("shoplens_feedback_total", "feedback events by kind and stage", ["kind", "stage"],
                                registry=r)


    def chat_turn(self, rec: Any) -> None:
        """Count one chat turn (`ui.chat.app.TurnRecord`): turns, latency, verified sentences."""
        tool = rec.tool or "none"
        self.chat_turns.labels(tool, rec.outcome, rec.answer_source or "none").inc()
        self.chat_latency.labels(tool).observe(rec.seconds)
        for verdict in ("verified", "repaired", "replaced"):
            if n := getattr(rec, verdict):
                self.chat_sentences.labels(verdict).inc(n)
