"""The cog SDK that model code imports."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import pathlib
import threading
import typing
from typing import Optional

import pytest

import cog
from cog.input import MISSING, FieldInfo


def test_public_names() -> None:
    for name in (
        "BasePredictor",
        "BaseRunner",
        "Input",
        "Path",
        "File",
        "Secret",
        "ConcatenateIterator",
        "AsyncConcatenateIterator",
        "BaseModel",
        "current_scope",
        "CancelationException",
        "emit_metric",
        "streaming",
        "concurrent",
        "Coder",
        "Opaque",
        "FieldInfo",
        "ExperimentalFeatureWarning",
        "__version__",
    ):
        assert name in cog.__all__, name
        assert hasattr(cog, name), name


def test_secret_is_masked_everywhere_but_its_getter() -> None:
    secret = cog.Secret("hunter2")
    assert secret.get_secret_value() == "hunter2"
    assert repr(secret) == "Secret('**********')"
    assert str(secret) == "**********"
    assert f"{secret}" == "**********"
    assert "hunter2" not in repr([secret, {"k": secret}])
    assert cog.Secret("hunter2") == secret and cog.Secret("other") != secret
    assert cog.Secret(secret).get_secret_value() == "hunter2"
    assert repr(cog.Secret("")) == "Secret('')"


def test_path_is_a_posix_path() -> None:
    p = cog.Path("/tmp/x.png")
    assert isinstance(p, pathlib.PosixPath) and isinstance(p, cog.Path)
    assert isinstance(p.parent, cog.Path)
    assert cog.Path.validate("/a/b") == cog.Path("/a/b")
    assert cog.Path.validate(pathlib.Path("/a")) == cog.Path("/a")
    assert cog.Path.validate(p) is p
    with pytest.raises(TypeError):
        cog.Path.validate(3)


def test_file_validate(tmp_path: pathlib.Path) -> None:
    (tmp_path / "f.bin").write_bytes(b"abc")
    with cog.File.validate(str(tmp_path / "f.bin")) as f:
        assert f.read() == b"abc"
    with cog.File.validate(f"file://{tmp_path}/f.bin") as f:
        assert f.read() == b"abc"
    assert cog.File.validate("data:text/plain;base64,aGVsbG8=").read() == b"hello"
    assert cog.File.validate("data:,a%20b").read() == b"a b"
    buf = io.BytesIO(b"x")
    assert cog.File.validate(buf) is buf


def test_input_returns_field_info() -> None:
    info = cog.Input(description="d", ge=1, le=2, choices=("a", "b"), deprecated=True)
    assert isinstance(info, FieldInfo)
    assert info.default is MISSING and info.description == "d"
    assert info.choices == ["a", "b"]
    assert cog.Input(default=None).default is None
    assert cog.Input(5).default == 5


class Item(cog.BaseModel):
    name: str
    score: float
    note: Optional[str]
    count: int = 0


def test_base_model_is_a_dataclass() -> None:
    item = Item(name="a", score=1.5)
    assert (item.name, item.score, item.note, item.count) == ("a", 1.5, None, 0)
    assert dataclasses.is_dataclass(item)
    assert [f.name for f in dataclasses.fields(item)] == ["name", "score", "note", "count"]
    assert Item("a", 1.5, "n", 2) == Item(name="a", score=1.5, note="n", count=2)
    assert repr(item) == "Item(name='a', score=1.5, note=None, count=0)"


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((), {"score": 1.0}, "Item() missing required field: 'name'"),
        ((), {"name": "a", "score": 1.0, "bogus": 1}, "Item() got unexpected fields: bogus"),
        (("a",), {"name": "b", "score": 1.0}, "Item() got multiple values for 'name'"),
        (("a", 1.0, None, 1, 2), {}, "Item() takes 4 positional arguments but 5 were given"),
    ],
)
def test_base_model_rejects_bad_arguments(args: tuple, kwargs: dict, message: str) -> None:
    with pytest.raises(TypeError) as info:
        Item(*args, **kwargs)
    assert str(info.value) == message


def test_base_model_subclass_inherits_fields() -> None:
    class Child(Item):
        extra: bool = False

    child = Child(name="c", score=0.0, extra=True)
    assert (child.name, child.extra, child.count) == ("c", True, 0)


def test_concatenate_iterators_are_generic() -> None:
    assert typing.get_origin(cog.ConcatenateIterator[str]) is cog.ConcatenateIterator
    assert typing.get_args(cog.AsyncConcatenateIterator[str]) == (str,)


def test_cancelation_is_not_an_exception() -> None:
    assert issubclass(cog.CancelationException, BaseException)
    assert not issubclass(cog.CancelationException, Exception)
    with pytest.raises(cog.CancelationException):
        try:
            raise cog.CancelationException()
        except Exception:  # a model's broad handler must not swallow a cancel
            pytest.fail("caught by except Exception")


def test_base_classes() -> None:
    assert cog.BasePredictor().setup() is None
    with pytest.raises(NotImplementedError):
        cog.BasePredictor().predict()
    with pytest.raises(NotImplementedError):
        cog.BaseRunner().run()


# --- scope ---------------------------------------------------------------------------------------
def test_record_metric_modes() -> None:
    scope = cog.Scope(context={"user": "u1"})
    with cog.use_scope(scope):
        current = cog.current_scope()
        assert current is scope and current.context == {"user": "u1"}
        current.record_metric("tokens", 3)
        current.record_metric("tokens", 4, mode="incr")
        current.record_metric("steps", "a", mode="append")
        current.record_metric("steps", "b", mode="append")
        cog.emit_metric("ratio", 0.5)
    assert scope.metrics == {"tokens": 7, "steps": ["a", "b"], "ratio": 0.5}
    assert cog.current_scope() is not scope
    with pytest.raises(TypeError, match="Invalid metric mode: 'bogus'"):
        scope.record_metric("x", 1, mode="bogus")


def test_metrics_follow_cog_023s_recorder() -> None:
    """scope.metrics as Cog 0.23.1 has it (its results measured beside it)."""
    scope = cog.Scope()
    scope.record_metric("timing.inference", 0.5)  # a dotted name nests
    scope.metrics.record("logprobs", -1.2, mode="append")
    scope.metrics.record("logprobs", -0.3, mode="append")
    scope.metrics.record("n", 1, mode="incr")
    scope.metrics.record("n", 2, mode="incr")
    scope.metrics["plain"] = 42
    scope.record_metric("gone", 1)
    del scope.metrics["gone"]
    scope.record_metric("once", 1)
    scope.record_metric("once", 2, mode="append")  # a scalar becomes a list
    assert scope.metrics == {
        "timing": {"inference": 0.5},
        "logprobs": [-1.2, -0.3],
        "n": 3,
        "plain": 42,
        "once": [1, 2],
    }
    scope.metrics.delete("n")
    scope.record_metric("n", "now a string")  # allowed after a delete
    assert scope.metrics["n"] == "now a string"


@pytest.mark.parametrize(
    ("name", "value", "mode", "error", "message"),
    [
        (
            "a",
            None,
            None,
            TypeError,
            "Unsupported metric value type: NoneType. Expected bool, "
            "int, float, str, list, or dict.",
        ),
        ("a", True, "incr", TypeError, "Increment mode requires int or float, got bool"),
        ("predict_time", 1, None, ValueError, "'predict_time' is reserved by the runtime"),
        ("cog.x", 1, None, ValueError, "the 'cog.' prefix is reserved for system metrics"),
        ("_a", 1, None, ValueError, "metric name segment '_a' must start with a letter"),
        ("a_", 1, None, ValueError, "metric name segment 'a_' must end with a letter or digit"),
        (
            "a__b",
            1,
            None,
            ValueError,
            "metric name segment 'a__b' must not contain consecutive underscores",
        ),
        (
            "a..b",
            1,
            None,
            ValueError,
            "metric name must not contain empty segments (consecutive dots)",
        ),
        (
            "a.b.c.d.e",
            1,
            None,
            ValueError,
            "metric name must have at most 4 dot-separated segments (got 5)",
        ),
        (
            "a" * 129,
            1,
            None,
            ValueError,
            "metric name must be 128 characters or fewer (got 129 characters)",
        ),
    ],
)
def test_metric_refusals_read_as_cogs(
    name: str, value: object, mode: Optional[str], error: type, message: str
) -> None:
    with pytest.raises(error) as info:
        cog.Scope().record_metric(name, value, mode)
    assert str(info.value) == message


def test_a_metric_keeps_its_type_until_deleted() -> None:
    scope = cog.Scope()
    scope.record_metric("a", 1)
    with pytest.raises(TypeError) as info:
        scope.record_metric("a", 1.5)
    assert str(info.value) == "Metric 'a' has type int, cannot set to float without deleting first"
    assert scope.metrics == {"a": 1}


async def test_scopes_are_isolated_across_asyncio_tasks() -> None:
    barrier = asyncio.Event()
    started = 0

    async def prediction(i: int) -> cog.Scope:
        nonlocal started
        scope = cog.Scope(context={"i": str(i)})
        with cog.use_scope(scope):
            started += 1
            if started == 10:
                barrier.set()
            await barrier.wait()  # every task is inside its scope at the same time
            cog.current_scope().record_metric("i", i)
            assert cog.current_scope().context == {"i": str(i)}
        return scope

    scopes = await asyncio.wait_for(asyncio.gather(*(prediction(i) for i in range(10))), 30)
    assert [s.metrics for s in scopes] == [{"i": i} for i in range(10)]


def test_scopes_are_isolated_across_threads() -> None:
    barrier = threading.Barrier(4, timeout=30)
    results: dict[int, dict] = {}

    def prediction(i: int) -> None:
        scope = cog.Scope()
        with cog.use_scope(scope):
            barrier.wait()
            cog.current_scope().record_metric("i", i)
        results[i] = scope.metrics

    threads = [threading.Thread(target=prediction, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == {i: {"i": i} for i in range(4)}


def test_streaming_marks_the_function_and_returns_it() -> None:
    def predict() -> str:
        return "x"

    assert cog.streaming(predict) is predict
    assert predict.__cog_streaming__ is True  # type: ignore[attr-defined]

    @cog.streaming()
    def other() -> str:
        return "y"

    assert other.__cog_streaming__ is True  # type: ignore[attr-defined]
    assert other() == "y"


def test_concurrent_checks_like_cog() -> None:
    async def predict() -> str:
        return "x"

    assert cog.concurrent(max=4)(predict) is predict
    assert predict.__cog_concurrent_max__ == 4  # type: ignore[attr-defined]

    def sync_predict() -> str:
        return "x"

    with pytest.raises(TypeError, match="requires an async function"):
        cog.concurrent(max=2)(sync_predict)
    with pytest.raises(ValueError, match="at least 1"):
        cog.concurrent(max=0)
    with pytest.raises(TypeError, match="must be an integer"):
        cog.concurrent(max=True)


def test_coder_lookup_and_json_coder() -> None:
    from cog.coder import Coder, json_coder

    Coder.register(json_coder.JsonCoder)
    coder = Coder.lookup(typing.Dict[str, typing.Any])
    assert isinstance(coder, json_coder.JsonCoder)
    assert coder.decode({"a": 1}) == {"a": 1} and coder.encode({"b": 2}) == {"b": 2}
    assert Coder.lookup(int) is None


def test_runner_scope_and_record_metric() -> None:
    class Runner(cog.BaseRunner):
        def run(self) -> str:
            self.record_metric("tokens", 3)
            assert self.scope is cog.current_scope()
            return "x"

    scope = cog.Scope()
    with cog.use_scope(scope):
        Runner().run()
    assert scope.metrics == {"tokens": 3}


def test_metrics_outside_a_prediction_are_ignored() -> None:
    """As Cog's no-op scope: setup code may record metrics; nothing raises or piles up."""
    detached = cog.current_scope()
    for i in range(1000):
        detached.record_metric("steps", i, mode="append")
        detached.metrics["bad name!"] = None
    assert detached.metrics == {}


def test_version_is_the_projects() -> None:
    import importlib.metadata

    assert cog.__version__ == importlib.metadata.version("cog-pool")
    assert issubclass(cog.ExperimentalFeatureWarning, FutureWarning)
