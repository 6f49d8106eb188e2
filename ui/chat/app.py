"""The merchandiser chat (Gradio Blocks): validate, call the agent, render. No business logic.

Layout: dataset picker and status line; the chat with example questions one click away and a
Stop button (it cancels the running turn and, with it, the model request); evidence panels: the
customer's timeline (events over time by type, one row per frequent item), the result's table
(ranked candidates with per-source scores, targeted customers, at-risk customers, profile
attributes, churn drivers...; human column names in the question's language, CSV download)
and a bar chart of its numbers; the raw JSON answer folded away below. Evidence is shown as soon
as retrieval has it, before the model answers.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from agent.app.runtime import Runtime
from agent.app.service import ShopLensService
from agent.chat.results import Timeline
from agent.chat.router import ChatAgent, ChatEvent, Conversation, detect_language
from agent.chat.tools import ToolContext, interactive_config
from agent.tasks.next_item import NextItemConfig
from ui.chat.render import (
    chart_frame,
    items_frame,
    readable_table,
    safe_md,
    status_line,
    timeline_figure,
    write_csv,
)

EXAMPLES = [
    "What will customer 17850 buy next, and why?",
    "客户17850接下来可能买什么？为什么？",
    "Show the purchase history of customer 12347",
    "Describe customer 12347's shopping style.",
    "Which customers who bought in October are at risk of churning?",
    "Who should we target for the WHITE HANGING HEART T-LIGHT HOLDER?",
    "How do people feel about item B0009RF9DW? What do they complain about?",
    "Find products like a red retrospot lunch bag",
]
MAX_QUESTION_CHARS = 500

Outputs = tuple[Any, ...]
# The panels a turn updates, in the order of the handler's outputs after (chat, status).
PANELS = ("timeline", "items", "note", "breakdown", "details", "csv")
log = logging.getLogger(__name__)


@dataclass
class TurnRecord:
    """One chat turn, for the log and the metrics: who (the key id), which tool, who wrote the
    answer and what the verifier did. Never the question's text (it may hold personal data)."""

    user: str | None
    dataset: str | None
    tool: str | None
    route_source: str | None
    answer_source: str | None
    outcome: str  # "answered", "refused" (empty, too long, no dataset) or "error"
    seconds: float
    checked: int = 0
    verified: int = 0
    repaired: int = 0
    replaced: int = 0


class ChatController:
    """Holds the runtime and turns one question into a stream of UI updates."""

    def __init__(self, runtime: Runtime, *, use_model: bool = True,
                 next_item_config: NextItemConfig | None = None, heartbeat_s: float = 8.0,
                 on_turn: Callable[[TurnRecord], None] | None = None):
        self.runtime = runtime
        self.on_turn = on_turn  # e.g. the API's metrics (ui.api.chat_gate.mount_gated_chat)
        self.service = ShopLensService(runtime, use_model=use_model)
        self.use_model = use_model
        self.config = next_item_config or interactive_config(self.service)
        self.heartbeat_s = heartbeat_s
        # CSV downloads: one folder per app under the system temp dir (where Gradio serves files from)
        self.csv_dir = Path(tempfile.mkdtemp(prefix="shoplens-csv-"))

    def datasets(self) -> list[str]:
        return self.runtime.store.datasets()

    async def respond(self, question: str, history: list[dict[str, str]] | None, dataset: str | None,
                      conversation: Conversation | None = None, user: str | None = None) -> AsyncIterator[Outputs]:
        """Gradio handler: yields (chat, status, *PANELS) updates.

        `conversation` is the session's follow-up context (a `gr.State`), updated in place;
        `user` the signed-in key's id, for the turn's log line and `on_turn` record.
        Always yields at least once, whatever fails.
        """
        rec = TurnRecord(user=user, dataset=dataset, tool=None, route_source=None, answer_source=None,
                         outcome="refused", seconds=0.0)
        t0 = time.perf_counter()
        try:
            async for out in self._respond(question, history, dataset, conversation, rec):
                yield out
        finally:
            rec.seconds = round(time.perf_counter() - t0, 3)
            log.info("chat turn %s", asdict(rec))
            if self.on_turn is not None:
                try:
                    self.on_turn(rec)
                except Exception:  # noqa: BLE001 - a metrics hook must not break the chat
                    log.exception("chat on_turn hook failed")

    async def _respond(self, question: str, history: list[dict[str, str]] | None, dataset: str | None,
                       conversation: Conversation | None, rec: TurnRecord) -> AsyncIterator[Outputs]:
        history = list(history or [])
        question = (question or "").strip()
        lang = detect_language(question)
        nothing = tuple(gr.update() for _ in PANELS)
        if not question:
            yield history, status_line("warn", "Type a question first.", lang), *nothing
            return
        if len(question) > MAX_QUESTION_CHARS:
            yield history, status_line("warn", f"Questions are limited to {MAX_QUESTION_CHARS} characters.", lang), *nothing
            return
        if not dataset or dataset not in self.datasets():
            yield history, status_line("warn", f"Pick an ingested dataset ({', '.join(self.datasets()) or 'none yet: run shoplens ingest --events FILE --name NAME'}).", lang), *nothing
            return
        history += [{"role": "user", "content": safe_md(question)}, {"role": "assistant", "content": "…"}]
        answer = ""
        # Only what changed is sent on each yield (a token must not re-send the chart).
        panels: dict[str, Any] = {"timeline": None, "items": None, "note": gr.update(value="", visible=False),
                                  "breakdown": gr.update(visible=False), "details": gr.update(value=None),
                                  "csv": gr.update(visible=False)}
        dirty = set(panels)
        status = status_line("info", "working…", lang)

        def frame(final: bool = False) -> Outputs:
            # The last frame re-sends every panel: Gradio sends a run's last values whole at the
            # end (earlier frames are diffs), so a panel update the browser missed mid-stream
            # (seen as an empty candidate table on a loaded 2-core box) is restored.
            if final:
                dirty.update(k for k, v in panels.items() if v is not None)
            out = tuple(panels[k] if k in dirty else gr.update() for k in PANELS)
            dirty.clear()
            return (history, status, *out)

        yield frame()
        ctx = ToolContext(self.runtime, self.service, dataset, self.config)
        try:
            agent = ChatAgent(ctx, use_model=self.use_model, heartbeat_s=self.heartbeat_s)
            async for ev in agent.ask(question, conversation):
                if ev.kind == "status":
                    status = status_line("info", ev.text, lang)
                elif ev.kind == "route" and ev.route is not None:
                    call = ev.route.call
                    rec.tool, rec.route_source = call.tool, ev.route.source
                    args = ", ".join(f"{k}={v}" for k, v in call.args.items())
                    note = f" ({ev.route.note})" if ev.route.note else ""
                    status = status_line("warn" if ev.route.source == "rules" else "info",
                                         f"tool: {call.tool}({args}) chosen by {ev.route.source}{note}", lang)
                elif ev.kind == "evidence" and ev.result is not None:
                    r = ev.result
                    if isinstance(r, Timeline):
                        panels["timeline"] = timeline_figure(r)
                        dirty.add("timeline")
                    if not isinstance(r, Timeline) or panels["items"] is None:
                        self._show_table(r, lang, panels)
                        dirty.update({"items", "note", "csv", "breakdown", "details"})
                elif ev.kind == "token":
                    answer += ev.text
                    history[-1] = {"role": "assistant", "content": safe_md(answer)}
                elif ev.kind == "done":
                    status = done_status(ev, lang)
                    rec.outcome, rec.answer_source = "answered", ev.answer_source
                    if ev.verification is not None:
                        v = ev.verification
                        rec.checked, rec.verified, rec.repaired, rec.replaced = (v.checked, v.verified,
                                                                                 v.repaired, v.replaced)
                yield frame(final=ev.kind == "done")
        except Exception as e:  # noqa: BLE001 - the UI must answer; the log keeps the trace
            log.exception("chat turn failed")
            rec.outcome = "error"
            history[-1] = {"role": "assistant", "content": safe_md(answer or f"Sorry, that failed: {e}")}
            status = status_line("warn", f"error: {type(e).__name__}: {e}", lang)
            yield frame(final=True)

    async def respond_in_session(self, question: str, history: list[dict[str, str]] | None, dataset: str | None,
                                 conversation: Conversation | None, request: gr.Request) -> AsyncIterator[Outputs]:
        """`respond` for the Blocks app: each update also carries the session's conversation
        (Gradio stores a `gr.State` output back into the session); the user is Gradio's
        (the gate's key id behind `shoplens serve`, None for a bare `shoplens ui`)."""
        conversation = conversation if conversation is not None else Conversation()
        user = getattr(request, "username", None) if request is not None else None
        async for out in self.respond(question, history, dataset, conversation, user):
            yield (*out, conversation)

    def _show_table(self, result: Any, lang: str, panels: dict[str, Any]) -> None:
        """The result's readable table (+ its note and CSV file), chart and raw JSON into `panels`."""
        table, note = readable_table(items_frame(result), lang)
        panels["items"] = table if table is not None else pd.DataFrame()
        panels["note"] = gr.update(value=safe_md(note), visible=bool(note))
        if table is not None and len(table):
            # a name of its own per turn: two sessions never share (or overwrite) a download
            stem = f"{getattr(result, 'tool', None) or result.kind}-{uuid.uuid4().hex[:12]}"
            panels["csv"] = gr.update(value=str(write_csv(table, self.csv_dir, stem)), visible=True)
        else:
            panels["csv"] = gr.update(value=None, visible=False)
        bars, title = chart_frame(result, lang)
        # bars in the result's own order (rank), not sorted by name
        panels["breakdown"] = gr.update(value=bars, visible=bars is not None, label=title, x_title=" ",
                                        y_title=title, sort=list(bars["name"]) if bars is not None else None,
                                        y_lim=[min(0.0, float(bars["value"].min())) if bars is not None else 0.0, None])
        panels["details"] = gr.update(value=result.model_dump(mode="json"))


def done_status(ev: ChatEvent, lang: str) -> str:
    """The status line at the end of a turn, in the question's language: who wrote the answer
    and what the verifier did to the model's sentences ("✅ done · 3 of 3 sentences verified" /
    "✅ 完成 · 3 句中 3 句已核实")."""
    zh = lang == "zh"
    v = ev.verification
    counts = ""
    if v is not None and v.checked:
        ok = v.verified + v.repaired
        counts = (f" · {v.checked} 句中 {ok} 句已核实" + (f"（{v.repaired} 句经一次修正）" if v.repaired else "")
                  + (f"，{v.replaced} 句由标注的模板替换" if v.replaced else "") if zh else
                  f" · {ok} of {v.checked} sentences verified" + (f" ({v.repaired} after a repair)" if v.repaired else "")
                  + (f", {v.replaced} replaced by the labelled template" if v.replaced else ""))
    if ev.answer_source == "template" and not counts:
        return status_line("warn", (f"模型不可用或出错，此回答仅来自检索（retrieval only）：{ev.text}" if zh else
                                    f"The model is unavailable or failed, so this answer comes from retrieval only: "
                                    f"{ev.text}"), lang)
    if ev.answer_source == "template":
        return status_line("warn", ("模型的回答未通过核实，显示标注的模板回答" if zh else
                                    "The model's answer failed the verifier, so the labelled template answer is "
                                    "shown") + counts, lang)
    return status_line("warn" if v is not None and v.replaced else "ok", ("完成" if zh else "done") + counts, lang)


def build_chat_app(runtime: Runtime, *, use_model: bool = True,
                   next_item_config: NextItemConfig | None = None,
                   on_turn: Callable[[TurnRecord], None] | None = None) -> gr.Blocks:
    """The chat as a `gr.Blocks` (not launched). `use_model=False` answers from retrieval only;
    `on_turn` gets each turn's `TurnRecord` (metrics)."""
    ctl = ChatController(runtime, use_model=use_model, next_item_config=next_item_config, on_turn=on_turn)
    choices = ctl.datasets()
    default = "online-retail" if "online-retail" in choices else (choices[0] if choices else None)
    with gr.Blocks(title="ShopLens chat", analytics_enabled=False) as app:
        gr.Markdown("## ShopLens: ask about customers, products and segments (English or 中文)")
        with gr.Row():
            dataset = gr.Dropdown(choices=choices, value=default, label="Dataset", elem_id="dataset", scale=1)
            status = gr.Markdown("Ready.", elem_id="status")
        with gr.Row():
            with gr.Column(scale=3):
                chat = gr.Chatbot(label="Answer", elem_id="chat", height=420, sanitize_html=True,
                                  allow_tags=False, feedback_options=None)
                question = gr.Textbox(label="Question", placeholder=EXAMPLES[0], elem_id="question",
                                      max_length=MAX_QUESTION_CHARS, lines=1)
                with gr.Row():
                    send = gr.Button("Ask", variant="primary", elem_id="send")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                gr.Examples(examples=[[q] for q in EXAMPLES], inputs=[question], label="Try")
            with gr.Column(scale=4):
                timeline = gr.Plot(label="Customer timeline (events over time by type, per item)",
                                   elem_id="timeline", format="png")
                items = gr.Dataframe(label="Result table", elem_id="candidates", wrap=True, interactive=False)
                note = gr.Markdown("", elem_id="table-note", visible=False)
                csv = gr.DownloadButton("Download table (CSV)", elem_id="csv", visible=False, size="sm")
                breakdown = gr.BarPlot(pd.DataFrame(columns=["name", "value"]), x="name", y="value",
                                       label="Chart", elem_id="breakdown", visible=False, x_label_angle=-30)
                with gr.Accordion("Raw answer (JSON)", open=False):
                    details = gr.JSON(label="Task details", elem_id="details")
        # per browser session (deep-copied): follow-up questions keep the customer and product
        conversation = gr.State(Conversation())
        outputs = [chat, status, timeline, items, note, breakdown, details, csv, conversation]
        inputs = [question, chat, dataset, conversation]
        ev1 = send.click(ctl.respond_in_session, inputs, outputs)
        ev2 = question.submit(ctl.respond_in_session, inputs, outputs)
        stop.click(lambda: "Stopped.", None, status, cancels=[ev1, ev2])
        dataset.change(lambda: ([], "Ready.", None, None, Conversation()), None,
                       [chat, status, timeline, items, conversation])
    return app


def mount_chat(fastapi_app: Any, runtime: Runtime, path: str = "/ui", *,
               auth_dependency: Callable[[Any], str | None] | None = None, **kwargs: Any) -> Any:
    """Mount the chat on an existing FastAPI app (beside the JSON API); returns the app.

    `auth_dependency` (request -> user id or None) is Gradio's: None refuses its routes with 401.
    `shoplens serve` mounts it with `ui.api.chat_gate.mount_gated_chat`, which passes
    `gradio_user` here and puts the whole mount behind the API's keys; `kwargs` go to
    `build_chat_app`.
    """
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    return gr.mount_gradio_app(fastapi_app, build_chat_app(runtime, **kwargs).queue(), path=path,
                               auth_dependency=auth_dependency)
