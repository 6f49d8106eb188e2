"""The front door: `shoplens --help` lists every command with one line and an example, each
command's --help ends with its example, and options with fixed values show their choices."""

from __future__ import annotations

from typing import get_args

import click
import pytest
import typer
from typer.testing import CliRunner

from agent.data.candidates import SOURCES
from agent.ingest import LOADERS
from agent.llm.servers.embedded import PROFILES
from eval import aspect_eval, sentiment_eval
from eval.run_checks import BUILTIN_PROTOCOLS
from eval.run_llmrank_baselines import GAMES200_SOURCES
from eval.runner import RANKERS
from eval.store_protocols import CANDIDATE_SETS, STORE_PROTOCOLS
from ui import eval_cli, sentiment_cli
from ui.cli import COMMANDS, app
from ui.eval_cli import EVAL_EXAMPLES
from ui.options import IngestDataset, ModelProfile

ENV = {"COLUMNS": "100", "TERMINAL_WIDTH": "100"}


def _help(*args: str) -> list[str]:
    r = CliRunner().invoke(app, [*args, "--help"], env=ENV, prog_name="shoplens")
    assert r.exit_code == 0, r.output
    return r.output.splitlines()


def _commands(group: click.Group) -> list[str]:
    ctx = click.Context(group)
    return group.list_commands(ctx)


def test_top_level_help_lists_every_command_with_one_line_and_an_example() -> None:
    lines = _help()
    assert lines[0] == "Usage: shoplens [OPTIONS] COMMAND [ARGS]..."
    assert "  recommend   Predict a user's next k items (JSON on stdout)." in lines
    assert "  precompute  Precompute explained next-item answers for many users." in lines
    assert "  churn       Churn risk: P(no purchase in N days), drivers, action." in lines
    assert "  eval        Offline evaluation, rescore and compare." in lines
    names = _commands(typer.main.get_command(app))  # type: ignore[arg-type]
    assert names == list(COMMANDS)  # every command registered is listed, in this order
    listed = lines[lines.index("Commands:") + 1:lines.index("  Examples:") - 1]
    assert [x.split()[0] for x in listed] == names  # one line each, none truncated
    assert not any(x.endswith("...") for x in listed)
    examples = [x.strip() for x in lines[lines.index("  Examples:") + 2:]]
    assert examples == list(COMMANDS.values())
    assert all(x.startswith(f"shoplens {name}") for name, x in COMMANDS.items())
    assert "as they land" not in "\n".join(lines)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_command_help_ends_with_its_example(name: str) -> None:
    lines = _help(name)
    if name == "eval":
        assert lines[-len(EVAL_EXAMPLES):] == [f"    {x}" for x in EVAL_EXAMPLES.values()]
    else:
        assert lines[-3:] == ["  Example:", "", f"    {COMMANDS[name]}"]


def test_eval_commands_each_have_one_line_and_an_example() -> None:
    group = typer.main.get_command(app).commands["eval"]  # type: ignore[attr-defined]
    assert sorted(_commands(group)) == sorted(EVAL_EXAMPLES)
    lines = _help("eval")
    # one line per command (the column width follows the longest command name)
    assert "rescore Recompute a run's metrics from its recorded cases." in {" ".join(x.split()) for x in lines}
    for name, example in EVAL_EXAMPLES.items():
        assert _help("eval", name)[-1] == f"    {example}"


def test_fixed_choices_are_shown_in_help() -> None:
    sentiment = [" ".join(ln.split()) for ln in _help("sentiment")]  # column widths follow the longest flag
    assert "--by <item|user> trends grouped by item or by user [default: item]" in sentiment
    assert "--profile <1.5b|0.5b> embedded model profile (default: 1.5b)" in sentiment
    assert any(x.startswith("  --position <shuffle|first|last>") for x in _help("eval", "next-item"))
    assert "  dataset <online-retail|amazon-games|amazon-industrial|amazon-beauty|taobao>" in _help("ingest")


def test_a_value_outside_the_choices_is_refused_before_anything_runs() -> None:
    r = CliRunner().invoke(app, ["sentiment", "--dataset", "d", "--by", "shop"], env=ENV)
    assert r.exit_code == 2 and "'shop' is not one of 'item', 'user'" in r.output


def test_choice_sets_match_their_registries() -> None:
    assert get_args(IngestDataset) == tuple(LOADERS)
    assert set(get_args(ModelProfile)) == set(PROFILES)
    assert get_args(eval_cli.Ranker) == RANKERS
    assert set(get_args(eval_cli.Candidates)) == {*GAMES200_SOURCES, "6k-random", "6k-pop", *CANDIDATE_SETS}
    assert set(get_args(eval_cli.Protocol)) == {*STORE_PROTOCOLS, *BUILTIN_PROTOCOLS}
    assert set(get_args(eval_cli.ServedSource)) == set(SOURCES)
    assert get_args(sentiment_cli.SentimentSet) == sentiment_eval.SETS
    assert get_args(sentiment_cli.SentimentRanker) == sentiment_eval.RANKERS
    assert get_args(sentiment_cli.AspectsRanker) == aspect_eval.RANKERS
