"""Models Cog 0.23 serves (issue 9), each through a real runner: they load, and each input
and output shape travels as Cog's does. Models: tests/models/compat/."""

from __future__ import annotations

import ast
import os

import pytest

from coglet import protocol
from tests.coglet.harness import PROJECT_ROOT

COMPAT = os.path.join(PROJECT_ROOT, "tests", "models", "compat")


@pytest.fixture
def compat(spawn):
    def _spawn(ref: str, **kwargs):
        runner = spawn(ref, model_dir=COMPAT, **kwargs)
        runner.wait_ready()
        return runner

    return _spawn


def run(runner, prediction_id: str, input: dict):
    runner.submit(prediction_id, input)
    return runner.wait_done(prediction_id)


def typed(state) -> list:
    assert state.status == "succeeded", (state.error, state.logs)
    return ast.literal_eval(state.output)


def test_union_inputs_keep_the_wire_type(compat) -> None:
    runner = compat("shapes.py:Unions")
    assert typed(run(runner, "int", {"u": 1}))[0] == ["int", 1]
    assert typed(run(runner, "float", {"u": 1.5}))[0] == ["float", 1.5]
    assert typed(run(runner, "str", {"u": "x"}))[0] == ["str", "x"]
    assert typed(run(runner, "null", {"u": None}))[0] == ["NoneType", None]
    assert typed(run(runner, "ints", {"nums": [1, 2]}))[1] == [["int", 1], ["int", 2]]
    assert typed(run(runner, "mixed", {"nums": [1, 2.5]}))[1] == [["int", 1], ["float", 2.5]]
    assert typed(run(runner, "empty", {"nums": []}))[1] == []
    assert typed(run(runner, "typing", {"v": "a"}))[2] == ["str", "a"]


@pytest.mark.parametrize(
    ("input", "field"),
    [
        ({"u": True}, "u"),  # a bool is not a number
        ({"u": {"a": 1}}, "u"),  # an object is no member
        ({"nums": ["3"]}, "nums"),  # a string in a numeric list
        ({"nums": [True]}, "nums"),
        ({"nums": None}, "nums"),  # null only where None is a member
        ({"v": None}, "v"),
        ({"v": 1.5}, "v"),
    ],
)
def test_union_rejects_values_of_no_member_type(compat, input: dict, field: str) -> None:
    runner = compat("shapes.py:Unions")
    state = run(runner, "bad", input)
    assert state.status == "failed"
    assert state.error.startswith(f"invalid input value: {field}=")
    assert "is not one of the types" in state.error


def test_nested_list_output_and_input(compat) -> None:
    runner = compat("shapes.py:Embeddings")
    state = run(runner, "emb", {"n": 2, "rows": [[1, 2], []]})
    assert state.status == "succeeded", state.error
    assert state.output == [[0.0, 0.0], [1.0, 0.5], [1.0, 2.0], []]
    state = run(runner, "bad", {"rows": [[1, "x"]]})
    assert state.status == "failed"
    assert state.error == "invalid input value: rows[0][1]='x' is not a number"


def test_optional_secret(compat) -> None:
    runner = compat("shapes.py:OptionalSecret")
    assert run(runner, "none", {}).output == "no key"
    assert run(runner, "given", {"key": "abc"}).output == "key of length 3"


def test_literal_choices(compat) -> None:
    runner = compat("shapes.py:Choices")
    assert run(runner, "default", {}).output == "fast:1"
    assert run(runner, "given", {"mode": "slow", "level": 3}).output == "slow:3"
    state = run(runner, "bad", {"mode": "medium"})
    assert (
        state.error == "invalid input value: mode='medium' does not match choices ['fast', 'slow']"
    )


def test_json_coder_dicts(compat) -> None:
    runner = compat("coders.py:JsonDicts")
    state = run(runner, "d", {"data": {"b": [1, {"c": None}], "a": "x"}})
    assert state.output == {"keys": ["a", "b"], "echo": {"b": [1, {"c": None}], "a": "x"}}


def test_custom_coder_decodes_inputs_and_encodes_outputs(compat) -> None:
    runner = compat("shapes.py:Points")
    state = run(runner, "p", {"p": {"x": 1, "y": 2}})
    assert state.status == "succeeded", (state.error, state.logs)
    assert state.output == [{"x": 1.0, "y": 2.0}, {"x": 2.0, "y": 1.0}]
    state = run(runner, "bad", {"p": [1, 2]})
    assert state.error == "invalid input value: p=[1, 2] is not an object"


def test_base_runner_run_method(compat) -> None:
    runner = compat("runner.py:Runner")
    assert run(runner, "r", {"text": "it"}).output == "ran it"


def test_streaming_mark_reaches_the_setup_result(spawn) -> None:
    streaming = spawn("shapes.py:Streamer", model_dir=COMPAT)
    plain = spawn("shapes.py:Unions", model_dir=COMPAT)
    assert streaming.wait_ready()["features"]["streaming"] is True
    assert plain.wait_ready()["features"]["streaming"] is False
    state = run(streaming, "s", {"n": 2})
    assert state.output == ["token0 ", "token1 "]


def test_openapi_of_the_new_shapes(compat) -> None:
    runner = compat("shapes.py:Unions")
    schema = protocol.read_json(runner.path(protocol.OPENAPI_FILE))
    props = schema["components"]["schemas"]["Input"]["properties"]
    assert props["u"]["anyOf"] == [{"type": "string"}, {"type": "number"}]
    assert props["u"]["nullable"] is True
    assert props["nums"]["anyOf"] == [
        {"type": "array", "items": {"type": "integer"}},
        {"type": "array", "items": {"type": "number"}},
    ]


# --- error text as Cog 0.23.1 words it (measured beside it; see bench/RESULTS.md) ---------------
@pytest.mark.parametrize(
    ("kind", "error"),
    [
        ("value", "Prediction failed: Prediction failed: ValueError: this is a value error"),
        ("exit", "Prediction failed: Prediction failed: SystemExit: 1"),
        ("empty", "Prediction failed: Prediction failed: RuntimeError: "),
    ],
)
def test_sync_error_names_the_exception(compat, kind: str, error: str) -> None:
    runner = compat("errors.py:Sync")
    state = run(runner, kind, {"kind": kind})
    assert state.status == "failed"
    assert state.error == error
    assert "Traceback (most recent call last)" in state.logs  # kept in logs (Cog drops it)


def test_generator_failing_midway(compat) -> None:
    runner = compat("errors.py:Gen")
    state = run(runner, "g", {"fail_at": 1})
    assert state.status == "failed"
    assert state.error == (
        "Prediction failed: Generator iteration error: RuntimeError: failed at item 1"
    )
    assert "Traceback (most recent call last)" in state.logs
    # A generator failing before its first item fails while iterating too.
    assert run(runner, "g0", {"fail_at": 0}).error.startswith(
        "Prediction failed: Generator iteration error: RuntimeError"
    )


@pytest.mark.parametrize(
    ("ref", "error"),
    [
        (
            "errors.py:AsyncErr",
            "Prediction failed: Async prediction failed: ValueError: async value error",
        ),
        (
            "errors.py:AsyncGen",
            "Prediction failed: Async prediction failed: RuntimeError: async generator failed",
        ),
    ],
)
def test_async_errors(compat, ref: str, error: str) -> None:
    runner = compat(ref)
    state = run(runner, "a", {})
    assert state.status == "failed"
    assert state.error == error


# --- COG_SETUP_TIMEOUT ---------------------------------------------------------------------------
def env_with(**extra: str) -> dict:
    return {**os.environ, "PYTHONPATH": PROJECT_ROOT, **extra}


def test_setup_timeout_fails_setup_with_cogs_text(spawn) -> None:
    runner = spawn("errors.py:SlowSetup", model_dir=COMPAT, env=env_with(COG_SETUP_TIMEOUT="1"))
    result = runner.wait_setup(timeout_s=30)
    assert result["status"] == "failed"
    assert result["error"] == "worker setup timed out"
    assert result["logs"].startswith("setup begins\n")
    assert result["logs"].endswith("worker setup timed out\n")
    assert runner.wait_exit() == protocol.EXIT_SETUP_FAILED
    assert "runner_exit reason=setup_timeout code=3 timeout_s=1.0" in runner.stderr


def test_setup_within_the_timeout_succeeds(spawn) -> None:
    runner = spawn(
        "errors.py:SlowSetup",
        model_dir=COMPAT,
        env=env_with(COG_SETUP_TIMEOUT="60", SLOW_SETUP_S="0.2"),
    )
    runner.wait_ready()
    assert run(runner, "p", {}).output == "ready"


@pytest.mark.parametrize("value", ["0", "soon", "-5"])
def test_bad_setup_timeout_is_ignored(spawn, value: str) -> None:
    runner = spawn(
        "errors.py:SlowSetup",
        model_dir=COMPAT,
        env=env_with(COG_SETUP_TIMEOUT=value, SLOW_SETUP_S="0"),
    )
    runner.wait_ready()
    runner.wait_stderr(f"setup_timeout_ignored COG_SETUP_TIMEOUT={value!r}")


def test_pydantic_model_output(compat) -> None:
    runner = compat("pydantic_out.py:Predictor")
    schema = protocol.read_json(runner.path(protocol.OPENAPI_FILE))
    output = schema["components"]["schemas"]["Output"]
    assert output["type"] == "object"
    assert output["required"] == ["text", "scores", "file"]
    assert output["properties"]["file"]["format"] == "uri"
    state = run(runner, "p", {"text": "abc"})
    assert state.status == "succeeded", (state.error, state.logs)
    assert state.output["text"] == "ABC" and state.output["scores"] == [0.5, 1.0]
    assert state.output["note"] is None
    assert state.output["file"][protocol.PATH_MARKER] == "/tmp/pydantic-out.txt"
