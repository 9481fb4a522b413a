"""Every model in examples/ loads in a real runner and predicts."""

from __future__ import annotations

import os

import yaml

from coglet import protocol
from tests.coglet.harness import PROJECT_ROOT

EXAMPLES = os.path.join(PROJECT_ROOT, "examples")


def _spawn_example(spawn, name: str):
    model_dir = os.path.join(EXAMPLES, name)
    with open(os.path.join(model_dir, "cog.yaml")) as f:
        cog_yaml = yaml.safe_load(f)
    concurrency = (cog_yaml.get("concurrency") or {}).get("max", 1)
    runner = spawn(cog_yaml["predict"], model_dir=model_dir, max_concurrency=concurrency)
    runner.wait_ready()
    return runner, cog_yaml


def test_every_example_is_covered_here() -> None:
    names = sorted(n for n in os.listdir(EXAMPLES) if os.path.isdir(os.path.join(EXAMPLES, n)))
    # embeddings needs torch: tests/pool/test_example_embeddings.py serves it with stand-ins.
    assert names == ["async", "embeddings", "files", "hello", "stream"]


def test_hello(spawn) -> None:
    runner, _ = _spawn_example(spawn, "hello")
    schema = protocol.read_json(runner.path(protocol.OPENAPI_FILE))
    assert schema["components"]["schemas"]["Input"]["required"] == ["text"]
    runner.submit("hello-1", {"text": "world"})
    assert runner.wait_done("hello-1").output == "hello world"


def test_stream_emits_tokens(spawn) -> None:
    runner, _ = _spawn_example(spawn, "stream")
    schema = protocol.read_json(runner.path(protocol.OPENAPI_FILE))
    output = schema["components"]["schemas"]["Output"]
    assert output["x-cog-array-type"] == "iterator"
    assert output["x-cog-array-display"] == "concatenate"
    runner.submit("tok", {"prompt": "the quick fox", "max_tokens": 5})
    state = runner.wait_done("tok")
    assert state.status == "succeeded"
    assert state.output == ["the ", "quick ", "fox ", "the ", "quick "]


def test_async_runs_four_at_once(spawn) -> None:
    runner, cog_yaml = _spawn_example(spawn, "async")
    assert cog_yaml["concurrency"]["max"] == 4
    runner.wait_stderr("capacity=4")
    words = ["stressed", "drawer", "live", "reward"]
    for i, word in enumerate(words):
        runner.submit(f"rev-{i}", {"text": word, "delay_ms": 200}, signal_runner=False)
    runner.send(protocol.SIG_RESCAN)  # one scan takes all four
    states = [runner.wait_done(f"rev-{i}") for i in range(len(words))]
    assert [s.output for s in states] == ["desserts", "reward", "evil", "drawer"]
    assert any("4 in flight" in s.logs for s in states)


def test_files_uppercases_a_text_file(spawn, tmp_path) -> None:
    runner, _ = _spawn_example(spawn, "files")
    source = tmp_path / "note.txt"
    source.write_text("hello files\n", encoding="utf-8")
    runner.submit("f1", {"file": str(source)})
    state = runner.wait_done("f1")
    assert state.status == "succeeded", state.error
    out_path = state.output[protocol.PATH_MARKER]
    assert os.path.isabs(out_path)
    assert os.path.basename(out_path) == "upper-note.txt"
    with open(out_path, encoding="utf-8") as f:
        assert f.read() == "HELLO FILES\n"
