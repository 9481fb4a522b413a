"""Configuration loading: precedence, errors that name the key, cog.yaml, gpus: auto."""

from __future__ import annotations

import dataclasses
import os
import stat
import sys
from pathlib import Path

import pytest
from pool_helpers import MODELS, PROJECT

from pool.config import PoolConfig, detect_gpus, env_var_name, load_config
from pool.errors import ConfigError

WORKER = str(MODELS / "worker")


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def load(path: str | None = None, env: dict[str, str] | None = None, **overrides: object):
    values = {"model.path": WORKER, **{k.replace("__", "."): v for k, v in overrides.items()}}
    return load_config(path, env=env or {}, overrides=values)


def test_defaults_fill_model_values_from_cog_yaml() -> None:
    config = load()
    assert config.model.path == WORKER
    assert config.model.predict == "predict.py:Predictor"
    assert config.runners.max_concurrency == 1  # cog.yaml has no concurrency: 1
    assert config.http.port == 5000 and config.http.host == "127.0.0.1"
    assert config.runners.gpus is None and config.runners.count == 1


def test_cog_yaml_concurrency_max_is_the_default_and_config_wins() -> None:
    async_model = str(MODELS / "async_worker")
    assert load(model__path=async_model).runners.max_concurrency == 4
    assert load(model__path=async_model, runners__max_concurrency=2).runners.max_concurrency == 2


def test_precedence_yaml_then_env_then_overrides(tmp_path: Path) -> None:
    path = write(tmp_path / "pool.yaml", "http:\n  port: 6001\n  host: 0.0.0.0\n")
    assert load(path).http.port == 6001
    env = {"COG_POOL_HTTP_PORT": "6002"}
    config = load(path, env)
    assert (config.http.port, config.http.host) == (6002, "0.0.0.0")
    assert load(path, env, http__port=6003).http.port == 6003
    # an override of None means "flag not given": the environment still applies
    assert load(path, env, http__port=None).http.port == 6002


def test_environment_variables_by_type(tmp_path: Path) -> None:
    env = {
        "COG_POOL_RUNNERS_GPUS": "0,1",
        "COG_POOL_RUNNERS_PER_GPU": "2",
        "COG_POOL_HTTP_REJECT_WHEN_BUSY": "true",
        "COG_POOL_QUEUES_REDIS_URL": "redis://127.0.0.1:6379/0",
        "COG_POOL_RUNNERS_PREDICT_TIMEOUT_S": "2.5",
        "COG_POOL_RUNNERS_ENV": '{"HF_HOME": "/cache", "N": 3}',
        "COG_POOL_MODEL_PYTHON": "",  # empty: back to the default (None)
        "COG_POOL_CONFIG": "/ignored/by/the/loader.yaml",  # read by the CLI, not a key
    }
    config = load(None, env)
    assert config.runners.gpus == ("0", "1")
    assert config.runners.per_gpu == 2
    assert config.http.reject_when_busy is True
    assert config.queues.redis.url == "redis://127.0.0.1:6379/0"
    assert config.runners.predict_timeout_s == 2.5
    assert config.runners.env == {"HF_HOME": "/cache", "N": "3"}
    assert config.model.python is None


def test_env_var_names() -> None:
    assert env_var_name("http.port") == "COG_POOL_HTTP_PORT"
    assert env_var_name("queues.amqp.url") == "COG_POOL_QUEUES_AMQP_URL"
    assert env_var_name("state_dir") == "COG_POOL_STATE_DIR"


def test_unknown_yaml_key_names_key_and_file(tmp_path: Path) -> None:
    path = write(tmp_path / "pool.yaml", "http:\n  prot: 5001\n")
    with pytest.raises(ConfigError) as e:
        load(path)
    assert e.value.key == "http.prot"
    assert str(path) in str(e.value) and "port" in str(e.value)  # lists the known keys


def test_unknown_top_level_and_nested_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^htp: unknown key"):
        load(write(tmp_path / "a.yaml", "htp: {}\n"))
    with pytest.raises(ConfigError, match=r"^queues\.redis\.urll: unknown key"):
        load(write(tmp_path / "b.yaml", "queues:\n  redis:\n    urll: redis://x\n"))
    with pytest.raises(ConfigError, match=r"^http: must be a mapping"):
        load(write(tmp_path / "c.yaml", "http: 5000\n"))


def test_moved_keys_say_where_they_went(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^http\.recent_max: moved to predictions\.recent_max"):
        load(write(tmp_path / "a.yaml", "http:\n  recent_max: 5\n"))
    config = load(write(tmp_path / "b.yaml", "predictions:\n  recent_max: 5\n"))
    assert config.predictions.recent_max == 5


def test_wrong_type_in_yaml_names_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load(write(tmp_path / "pool.yaml", "http:\n  port: five\n"))
    assert e.value.key == "http.port" and "integer" in str(e.value) and "five" in str(e.value)
    with pytest.raises(ConfigError, match=r"^http\.reject_when_busy: must be a boolean"):
        load(write(tmp_path / "b.yaml", "http:\n  reject_when_busy: 'yes please'\n"))
    with pytest.raises(ConfigError, match=r"^runners\.count: must be an integer"):
        load(write(tmp_path / "c.yaml", "runners:\n  count: 2.5\n"))


def test_malformed_yaml_gives_line_number(tmp_path: Path) -> None:
    path = write(tmp_path / "pool.yaml", "http:\n  port: 5000\n  host: [unclosed\nrunners: {}\n")
    with pytest.raises(ConfigError) as e:
        load(path)
    assert e.value.key == path
    assert "malformed YAML" in str(e.value) and "line " in str(e.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pool config not found"):
        load(str(tmp_path / "nope.yaml"))


def test_env_errors_name_the_variable() -> None:
    with pytest.raises(ConfigError) as e:
        load(None, {"COG_POOL_HTTP_PORT": "eighty"})
    assert e.value.key == "http.port" and "COG_POOL_HTTP_PORT" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load(None, {"COG_POOL_HTTP_PROT": "5000"})
    assert e.value.key == "COG_POOL_HTTP_PROT"
    with pytest.raises(ConfigError, match=r"^runners\.env: must be a mapping"):
        load(None, {"COG_POOL_RUNNERS_ENV": '["not", "a", "map"]'})


def test_unknown_override_key() -> None:
    with pytest.raises(ConfigError, match=r"^http\.nope: unknown key"):
        load(None, None, http__nope=1)


@pytest.mark.parametrize(
    ("key", "value", "must"),
    [
        ("http.port", 70000, "between 0 and 65535"),
        ("http.port", -1, "between 0 and 65535"),
        ("runners.per_gpu", 0, ">= 1"),
        ("runners.count", -2, ">= 1"),
        ("runners.max_concurrency", 0, ">= 1"),
        ("runners.max_restarts", -1, ">= 0"),
        ("runners.predict_timeout_s", 0, "> 0"),
        ("http.queue_limit", -1, ">= 0"),
        ("shutdown.grace_s", -5, ">= 0"),
        ("log_level", "loud", "one of"),
        ("event_loop", "trio", "one of auto, asyncio, uvloop"),
        ("queues.redis.url", "http://not-redis", "redis://"),
        ("queues.amqp.prefetch", 0, "between 1 and 65535"),
        ("queues.amqp.prefetch_max_per_slot", 1, "between 2 and 64"),
        ("queues.redis.read_ahead_per_slot", 17, "between 0 and 16"),
        ("queues.redis.read_ahead_per_slot", -1, "between 0 and 16"),
        ("runners.backoff_max_s", 0.01, ">= runners.backoff_initial_s"),
        ("predictions.recent_max_bytes", -1, ">= 0"),
        ("predictions.logs_max_bytes", 10, ">= 1024"),
        ("predictions.streamed_output_max_bytes", 0, ">= 1"),
        ("runners.max_runners", 0, ">= 1"),
        ("runners.healthcheck_interval_s", 0, "> 0"),
        ("runners.healthcheck_max_failures", 0, ">= 1"),
    ],
)
def test_impossible_values(key: str, value: object, must: str) -> None:
    with pytest.raises(ConfigError) as e:
        load(None, None, **{key.replace(".", "__"): value})
    assert e.value.key == key and must in str(e.value)


@pytest.mark.parametrize("value", ["auto", "asyncio", "uvloop"])
def test_event_loop_from_yaml_environment_and_command_line(tmp_path: Path, value: str) -> None:
    assert load().event_loop == "auto"
    assert load(write(tmp_path / "pool.yaml", f"event_loop: {value}\n")).event_loop == value
    assert env_var_name("event_loop") == "COG_POOL_EVENT_LOOP"
    assert load(None, {"COG_POOL_EVENT_LOOP": value}).event_loop == value
    assert load(None, None, event_loop=value).event_loop == value


def test_a_bad_event_loop_names_the_key_the_values_and_where_it_came_from(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError) as e:
        load(None, {"COG_POOL_EVENT_LOOP": "UVLOOP"})
    assert e.value.key == "event_loop"
    assert str(e.value) == (
        "event_loop: must be one of auto, asyncio, uvloop, got 'UVLOOP' "
        "(from environment variable COG_POOL_EVENT_LOOP)"
    )
    with pytest.raises(ConfigError, match=r"^event_loop: must be a string, got 1 \(in "):
        load(write(tmp_path / "pool.yaml", "event_loop: 1\n"))


def test_gpus_from_yaml_and_their_checks(tmp_path: Path) -> None:
    config = load(write(tmp_path / "a.yaml", "runners:\n  gpus: [0, 1, 2]\n  per_gpu: 2\n"))
    assert config.runners.gpus == ("0", "1", "2") and config.runners.per_gpu == 2
    with pytest.raises(ConfigError, match=r"^runners\.gpus: lists a GPU twice"):
        load(write(tmp_path / "b.yaml", "runners:\n  gpus: [0, 0]\n"))
    with pytest.raises(ConfigError, match=r"^runners\.env: must not set CUDA_VISIBLE_DEVICES"):
        load(write(tmp_path / "c.yaml", "runners:\n  env: {CUDA_VISIBLE_DEVICES: '3'}\n"))


def test_max_runners_may_not_be_below_the_configured_runners(tmp_path: Path) -> None:
    config = load(write(tmp_path / "a.yaml", "runners:\n  gpus: [0, 1]\n  max_runners: 2\n"))
    assert config.runners.max_runners == 2
    with pytest.raises(ConfigError, match=r"^runners\.max_runners: .*configured runners \(4\)"):
        load(
            write(tmp_path / "b.yaml", "runners:\n  gpus: [0, 1]\n  per_gpu: 2\n  max_runners: 3\n")
        )
    with pytest.raises(ConfigError, match=r"^runners\.max_runners: .*configured runners \(3\)"):
        load(None, None, runners__count=3, runners__max_runners=2)


def fake_nvidia_smi(bin_dir: Path, body: str) -> dict[str, str]:
    bin_dir.mkdir(exist_ok=True)
    exe = bin_dir / "nvidia-smi"
    exe.write_text("#!/bin/sh\n" + body)
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return {"PATH": f"{bin_dir}{os.pathsep}/usr/bin:/bin"}


def test_gpus_auto_counts_nvidia_smi_lines(tmp_path: Path) -> None:
    lines = "".join(f"echo 'GPU {i}: NVIDIA H100 (UUID: GPU-{i})'\n" for i in range(3))
    env = fake_nvidia_smi(tmp_path / "bin", lines)
    assert detect_gpus(env) == ("0", "1", "2")
    config = load(None, {**env, "COG_POOL_RUNNERS_GPUS": "auto"})
    assert config.runners.gpus == ("0", "1", "2")


def test_gpus_auto_without_nvidia_smi_is_cpu_only(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    config = load(None, {"PATH": str(tmp_path / "empty"), "COG_POOL_RUNNERS_GPUS": "auto"})
    assert config.runners.gpus is None


def test_gpus_auto_with_failing_nvidia_smi(tmp_path: Path) -> None:
    env = fake_nvidia_smi(tmp_path / "bin", "echo 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    with pytest.raises(ConfigError, match=r"^runners\.gpus: auto: .* exited with 9"):
        load(None, {**env, "COG_POOL_RUNNERS_GPUS": "auto"})


def test_missing_cog_yaml_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load(None, None, model__path=str(tmp_path))
    assert e.value.key == str(tmp_path / "cog.yaml") and "not found" in str(e.value)
    # with model.predict given, cog.yaml is optional
    assert load(None, None, model__path=str(tmp_path), model__predict="p.py:P").model.predict


def test_malformed_cog_yaml(tmp_path: Path) -> None:
    write(tmp_path / "cog.yaml", "predict: 'predict.py:Predictor'\nconcurrency: {max: [\n")
    with pytest.raises(ConfigError) as e:
        load(None, None, model__path=str(tmp_path))
    assert str(tmp_path / "cog.yaml") in str(e.value) and "line " in str(e.value)
    write(tmp_path / "cog.yaml", "build: {}\n")
    with pytest.raises(ConfigError, match="predict must be"):
        load(None, None, model__path=str(tmp_path))
    write(tmp_path / "cog.yaml", "predict: p.py:P\nconcurrency: {max: 0}\n")
    with pytest.raises(ConfigError, match=r"concurrency\.max must be an integer >= 1"):
        load(None, None, model__path=str(tmp_path))


def test_model_python_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^model\.python: interpreter .* not found"):
        load(None, None, model__python=str(tmp_path / "nope" / "python"))
    assert load(None, None, model__python=sys.executable).model.python == sys.executable


def test_missing_model_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^model\.path: model directory .* does not exist"):
        load(None, None, model__path=str(tmp_path / "gone"))


def _without_model(config: PoolConfig) -> dict[str, object]:
    d = dataclasses.asdict(config)
    d.pop("model")
    return d


def test_documented_pool_yaml_matches_the_defaults() -> None:
    documented = load(str(PROJECT / "config" / "pool.yaml"))
    assert _without_model(documented) == _without_model(load())


@pytest.mark.parametrize("name", ["per-gpu.yaml", "cpu.yaml", "queues.yaml"])
def test_example_configs_load(name: str) -> None:
    # model.path and model.python point into a deployment; here, at the fixture model
    config = load(str(PROJECT / "config" / "examples" / name), None, model__python=sys.executable)
    assert config.model.predict


def test_cog_yaml_run_train_and_environment(tmp_path: Path) -> None:
    """Cog 0.23's `run:` stands for `predict:`; `train:` and `environment:` are taken too."""
    write(
        tmp_path / "cog.yaml",
        'run: "run.py:Runner"\ntrain: "train.py:train"\n'
        "environment:\n  - COG_SETUP_TIMEOUT=30\n  - SHARED=model\n",
    )
    config = load(None, None, model__path=str(tmp_path), runners__env={"SHARED": "pool"})
    assert config.model.predict == "run.py:Runner"
    assert config.model.train == "train.py:train"
    assert config.runners.env == {"COG_SETUP_TIMEOUT": "30", "SHARED": "pool"}


def test_cog_yaml_predict_and_run_together_is_an_error(tmp_path: Path) -> None:
    write(tmp_path / "cog.yaml", 'predict: "p.py:P"\nrun: "r.py:R"\n')
    with pytest.raises(ConfigError, match="either predict or run"):
        load(None, None, model__path=str(tmp_path))


def test_cog_yaml_bad_environment_entry_names_it(tmp_path: Path) -> None:
    write(tmp_path / "cog.yaml", 'predict: "p.py:P"\nenvironment: ["NOVALUE"]\n')
    with pytest.raises(ConfigError, match="NAME=value strings \\(got 'NOVALUE'\\)"):
        load(None, None, model__path=str(tmp_path))
