"""The runner side of trainings (config.json train_ref, request kind "training") and of user
health checks (health.json), as the protocol in coglet/protocol.py and docs/architecture.md
defines them. Real runner processes; models in tests/models/compat/."""

from __future__ import annotations

import os

import pytest

from coglet import protocol
from tests.coglet.harness import PROJECT_ROOT, wait_until

COMPAT = os.path.join(PROJECT_ROOT, "tests", "models", "compat")


def config(predictor_ref: str, **extra: object) -> dict:
    return {"predictor_ref": predictor_ref, "max_concurrency": 1, "runner_index": 0, **extra}


def train(runner, prediction_id: str, input: dict):
    runner.submit(
        prediction_id, input, body={"id": prediction_id, "input": input, "kind": "training"}
    )
    return runner.wait_done(prediction_id)


def read_path(output: dict) -> str:
    with open(output[protocol.PATH_MARKER]) as f:
        return f.read()


# --- trainings ------------------------------------------------------------------------------------
def test_training_function_runs_for_kind_training(spawn) -> None:
    runner = spawn(
        "train.py:Predictor",
        model_dir=COMPAT,
        config=config("train.py:Predictor", train_ref="train.py:train"),
    )
    result = runner.wait_ready()
    assert result["features"] == {"streaming": False, "training": True, "healthcheck": False}

    state = train(runner, "t1", {"steps": 3, "mode": "full"})
    assert state.status == "succeeded", (state.error, state.logs)
    assert state.output["steps"] == 3
    assert read_path(state.output["weights"]) == "full:3"  # a Path field, for the pool to encode
    assert "training 3 steps (full)\n" in state.logs

    # The same runner still predicts (kind defaults to "prediction").
    runner.submit("p1", {"text": "y"})
    assert runner.wait_done("p1").output == "predicted y"


def test_training_input_is_checked_against_train_signature(spawn) -> None:
    runner = spawn(
        "train.py:Predictor",
        model_dir=COMPAT,
        config=config("train.py:Predictor", train_ref="train.py:train"),
    )
    runner.wait_ready()
    state = train(runner, "bad", {"steps": 0})
    assert state.error == "invalid input value: steps=0 fails constraint >= 1"
    # A training input is not a prediction input and the other way round.
    state = train(runner, "wrong-kind-input", {"text": "y"})
    assert state.status == "succeeded"
    assert "unknown input field ignored: 'text'" in state.logs
    state = train(runner, "fails", {"steps": 13})
    assert state.error == "Prediction failed: Training failed: ValueError: unlucky step count"


def test_training_class_runs_setup_then_train(spawn) -> None:
    runner = spawn(
        "train.py:Predictor",
        model_dir=COMPAT,
        config=config("train.py:Predictor", train_ref="train.py:Trainer"),
    )
    runner.wait_ready()
    state = train(runner, "t", {"steps": 4})
    assert state.status == "succeeded", state.error
    assert read_path(state.output["weights"]) == "base-weights+4"


def test_training_class_setup_waits_for_the_first_training(spawn, tmp_path) -> None:
    """A runner that only predicts never loads the trainer's model (Cog runs trainings in
    their own server); a failed trainer setup fails that training and is tried again."""
    ready = tmp_path / "ready"
    runner = spawn(
        "train.py:Predictor",
        model_dir=COMPAT,
        config=config("train.py:Predictor", train_ref="train.py:CountingTrainer"),
        env={**os.environ, "PYTHONPATH": PROJECT_ROOT, "TRAINER_READY": str(ready)},
    )
    result = runner.wait_ready()
    assert result["features"]["training"] is True
    assert "trainer setup" not in result["logs"]
    runner.submit("p", {"text": "x"})
    assert runner.wait_done("p").output == "predicted x"

    state = train(runner, "t1", {})
    assert state.error == "Prediction failed: Training failed: RuntimeError: base weights missing"
    assert "trainer setup #1\n" in state.logs  # the training's own logs
    ready.touch()
    state = train(runner, "t2", {})
    assert state.status == "succeeded", (state.error, state.logs)
    assert read_path(state.output["weights"]) == "setups=2"
    state = train(runner, "t3", {})
    assert read_path(state.output["weights"]) == "setups=2"  # set up once, then kept
    runner.wait_for(
        lambda: runner.stderr.count("train_setup_starting") >= 2, timeout_s=30, what="2 setups"
    )
    assert runner.stderr.count("train_setup_starting") == 2


def test_async_setup_of_a_sync_trainer(spawn) -> None:
    runner = spawn(
        "train.py:Predictor",
        model_dir=COMPAT,
        config=config("train.py:Predictor", train_ref="train.py:AsyncSetupTrainer"),
    )
    runner.wait_ready()
    state = train(runner, "t", {"steps": 2})
    assert state.status == "succeeded", (state.error, state.logs)
    assert read_path(state.output["weights"]) == "async-base+2"
    assert "async trainer setup\n" in state.logs


def test_openapi_has_cogs_training_components(spawn) -> None:
    runner = spawn(
        "train.py:Predictor",
        model_dir=COMPAT,
        config=config("train.py:Predictor", train_ref="train.py:train"),
    )
    runner.wait_ready()
    schemas = protocol.read_json(runner.path(protocol.OPENAPI_FILE))["components"]["schemas"]
    training_input = schemas["TrainingInput"]
    assert training_input["title"] == "TrainingInput"
    assert training_input["properties"]["steps"]["minimum"] == 1
    assert training_input["properties"]["mode"]["allOf"] == [
        {"$ref": "#/components/schemas/Trainingmode"}
    ]
    assert schemas["Trainingmode"]["enum"] == ["lora", "full"]
    assert schemas["mode"]["enum"] == ["a", "b"]  # predict()'s own choices stay apart
    assert schemas["TrainingOutput"] == {
        "title": "TrainingOutput",
        "type": "object",
        "properties": {
            "weights": {"title": "Weights", "type": "string", "format": "uri"},
            "steps": {"title": "Steps", "type": "integer"},
        },
        "required": ["weights", "steps"],
    }
    request = schemas["TrainingRequest"]["properties"]
    assert request["input"] == {"$ref": "#/components/schemas/TrainingInput"}
    response = schemas["TrainingResponse"]["properties"]
    assert response["output"] == {"$ref": "#/components/schemas/TrainingOutput"}
    assert schemas["Input"]["title"] == "Input"  # the prediction side is unchanged


def test_training_request_without_train_ref_fails_clearly(spawn) -> None:
    runner = spawn("train.py:Predictor", model_dir=COMPAT)
    assert runner.wait_ready()["features"]["training"] is False
    state = train(runner, "t", {})
    assert state.error == "this model has no trainer (cog.yaml has no train:)"
    runner.submit("k", {}, body={"id": "k", "input": {}, "kind": "fine-tune"})
    assert runner.wait_done("k").error == (
        "request kind must be one of ['prediction', 'training'], not 'fine-tune'"
    )


@pytest.mark.parametrize(
    ("train_ref", "reason"),
    [
        ("missing.py:train", "cannot read predictor file missing.py: No such file or directory"),
        ("train.py:Nowhere", "cannot find 'Nowhere' in train.py"),
    ],
)
def test_a_trainer_that_cannot_load_disables_trainings_only(
    spawn, train_ref: str, reason: str
) -> None:
    """Cog serves predict and train from separate processes: a broken train: never stops
    predictions. The reason shows in setup's logs and result, and in each training's error."""
    runner = spawn(
        "train.py:Predictor",
        model_dir=COMPAT,
        config=config("train.py:Predictor", train_ref=train_ref),
    )
    result = runner.wait_ready()
    assert result["features"]["training"] is False
    assert result["training_error"] == reason
    assert f"trainings disabled: {reason}\n" in result["logs"]
    runner.wait_stderr("training_disabled error=")
    runner.submit("p", {"text": "still"})
    assert runner.wait_done("p").output == "predicted still"
    assert train(runner, "t", {}).error == f"trainings are disabled: {reason}"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"train_ref": "train.py"}, "train_ref must be a string like 'train.py:train'"),
        ({"healthcheck_interval_s": 0}, "healthcheck_interval_s must be > 0"),
        ({"healthcheck_interval_s": "5"}, "healthcheck_interval_s must be a number of seconds"),
    ],
)
def test_bad_feature_config_exits_bad_config(spawn, extra: dict, message: str) -> None:
    runner = spawn(
        "train.py:Predictor", model_dir=COMPAT, config=config("train.py:Predictor", **extra)
    )
    assert runner.wait_exit() == protocol.EXIT_BAD_CONFIG
    assert message in runner.stderr


# --- user health checks ---------------------------------------------------------------------------
def health(runner) -> dict | None:
    return protocol.read_json(runner.path(protocol.HEALTH_FILE))


def wait_health(runner, healthy: bool, timeout_s: float = 30) -> dict:
    wait_until(
        lambda: (health(runner) or {}).get("healthy") is healthy,
        timeout_s=timeout_s,
        what=f"health.json healthy={healthy}",
    )
    result = health(runner)
    assert result is not None
    return result


def spawn_checked(spawn, tmp_path, ref: str, mode: str = "ok", **env: str):
    mode_file = tmp_path / "mode"
    mode_file.write_text(mode)
    runner = spawn(
        ref,
        model_dir=COMPAT,
        config=config(ref, healthcheck_interval_s=0.1),
        env={**os.environ, "PYTHONPATH": PROJECT_ROOT, "HEALTH_MODE_FILE": str(mode_file), **env},
    )
    return runner, mode_file


@pytest.mark.parametrize("ref", ["health.py:SyncCheck", "health.py:AsyncCheck"])
def test_healthcheck_results_with_cogs_wording(spawn, tmp_path, ref: str) -> None:
    runner, mode = spawn_checked(spawn, tmp_path, ref)
    assert runner.wait_ready()["features"]["healthcheck"] is True
    result = wait_health(runner, True)
    assert result["error"] is None and result["checked_at"].endswith("Z")

    mode.write_text("false")
    assert wait_health(runner, False)["error"] == (
        "Healthcheck failed: user-defined healthcheck returned False"
    )
    mode.write_text("raise")
    wait_until(
        lambda: (
            (health(runner) or {}).get("error")
            == "Healthcheck failed: RuntimeError: database unreachable"
        ),
        timeout_s=30,
        what="the raised error in health.json",
    )
    mode.write_text("none")  # only False is unhealthy, as Cog
    wait_health(runner, True)
    runner.wait_stderr("healthcheck_changed healthy=False")
    runner.wait_stderr("healthcheck ran")  # the check's output: the runner's log


def test_slow_healthcheck_times_out_without_blocking_predictions(spawn, tmp_path) -> None:
    runner, _ = spawn_checked(spawn, tmp_path, "health.py:SyncCheck", "slow", SLOW_CHECK_S="30")
    runner.wait_ready()
    # While the check hangs, predictions run (the check has its own thread).
    runner.submit("p", {})
    assert runner.wait_done("p", timeout_s=10).output == "done"
    result = wait_health(runner, False, timeout_s=30)
    assert (
        result["error"]
        == "Healthcheck failed: user-defined healthcheck timed out after 5.0 seconds"
    )


def test_health_change_signals_the_parent_once_per_change(spawn, tmp_path) -> None:
    runner, mode = spawn_checked(spawn, tmp_path, "health.py:SyncCheck")
    counts = runner.signals.counts
    base = counts[protocol.SIG_OUTPUT]
    runner.wait_ready()
    wait_health(runner, True)
    first = health(runner)
    assert first is not None
    # Repeats rewrite the file (checked_at moves) but do not log or signal a change.
    for _ in range(3):
        seen = (health(runner) or {}).get("checked_at")
        wait_until(
            lambda seen=seen: (health(runner) or {}).get("checked_at") != seen,
            timeout_s=30,
            what="another check",
        )
    wait_until(lambda: counts[protocol.SIG_OUTPUT] > base, timeout_s=30, what="a SIGHUP")
    assert counts[protocol.SIG_OUTPUT] - base == 1
    runner.wait_stderr("healthcheck_changed")
    assert runner.stderr.count("healthcheck_changed") == 1
    mode.write_text("false")
    wait_health(runner, False)
    wait_until(lambda: counts[protocol.SIG_OUTPUT] - base == 2, timeout_s=30, what="a 2nd SIGHUP")
    runner.wait_for(
        lambda: runner.stderr.count("healthcheck_changed") >= 2, timeout_s=30, what="2nd change"
    )
    assert runner.stderr.count("healthcheck_changed") == 2


def test_no_healthcheck_no_health_file(spawn, tmp_path) -> None:
    runner, _ = spawn_checked(spawn, tmp_path, "health.py:NoCheck")
    assert runner.wait_ready()["features"]["healthcheck"] is False
    runner.submit("p", {})
    runner.wait_done("p")
    assert health(runner) is None


def test_stop_is_not_held_by_a_hanging_healthcheck(spawn, tmp_path) -> None:
    runner, _ = spawn_checked(spawn, tmp_path, "health.py:SyncCheck", "slow", SLOW_CHECK_S="3600")
    runner.wait_ready()
    runner.wait_stderr("healthcheck_changed healthy=False", timeout_s=30)  # it hangs now
    assert runner.stop(timeout_s=20) == protocol.EXIT_OK


def test_async_training_error_text(spawn) -> None:
    runner = spawn(
        "train.py:AsyncPredictor",
        model_dir=COMPAT,
        config=config("train.py:AsyncPredictor", train_ref="train.py:async_train_fails"),
    )
    runner.wait_ready()
    state = train(runner, "t", {})
    assert state.error == (
        "Prediction failed: Async training failed: ValueError: async training failed here"
    )


# --- predict and train of different kinds (sync beside async) ---------------------------------
def test_async_train_beside_sync_predict(spawn) -> None:
    runner = spawn(
        "train.py:Predictor",
        model_dir=COMPAT,
        config=config("train.py:Predictor", train_ref="train.py:async_train"),
    )
    assert runner.wait_ready()["features"]["training"] is True
    state = train(runner, "t", {"steps": 5})
    assert state.status == "succeeded", (state.error, state.logs)
    assert state.output["steps"] == 5 and read_path(state.output["weights"]) == "async"
    runner.submit("p", {"text": "z"})
    assert runner.wait_done("p").output == "predicted z"


def test_async_generator_train_beside_sync_predict_streams(spawn) -> None:
    runner = spawn(
        "train.py:Predictor",
        model_dir=COMPAT,
        config=config("train.py:Predictor", train_ref="train.py:async_gen_train"),
    )
    runner.wait_ready()
    assert train(runner, "t", {"n": 3}).output == ["epoch0", "epoch1", "epoch2"]


def test_cancel_an_async_train_beside_sync_predict(spawn) -> None:
    runner = spawn(
        "train.py:Predictor",
        model_dir=COMPAT,
        config=config("train.py:Predictor", train_ref="train.py:slow_async_train"),
    )
    runner.wait_ready()
    runner.submit("t", {}, body={"id": "t", "input": {}, "kind": "training"})
    runner.wait_for(
        lambda: "async training started" in runner.predictions["t"].logs,
        timeout_s=30,
        what="the training to start",
    )
    runner.cancel("t")
    assert runner.wait_done("t").status == "canceled"
    runner.submit("p", {"text": "after"})  # the runner is free again
    assert runner.wait_done("p").output == "predicted after"


def test_sync_train_beside_async_predict(spawn) -> None:
    runner = spawn(
        "train.py:AsyncPredictor",
        model_dir=COMPAT,
        config=config("train.py:AsyncPredictor", train_ref="train.py:train", max_concurrency=2),
    )
    runner.wait_ready()
    state = train(runner, "t", {"steps": 2})
    assert state.status == "succeeded", (state.error, state.logs)
    assert read_path(state.output["weights"]) == "lora:2"
    assert "training 2 steps (lora)\n" in state.logs  # the thread's output is the training's
    state = train(runner, "bad", {"steps": 13})
    assert state.error == "Prediction failed: Training failed: ValueError: unlucky step count"
    runner.submit("p", {})
    assert runner.wait_done("p").output == "async predicted"
