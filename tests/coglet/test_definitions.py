"""Every predictor definition Cog rejects, with its exact message.

Each case writes a small predict.py into a fresh model directory, makes it the cwd (as the
runner does) and loads it; the error must be a PredictorError whose text is Cog's message.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from coglet.predictor import PredictorError, load_predictor

HEADER = """\
import datetime
from enum import Enum
from typing import AsyncIterator, Iterator, List, Optional, Union

from cog import (
    AsyncConcatenateIterator, BasePredictor, ConcatenateIterator, Input, Path, Secret,
)
"""


def load_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str, ref: str) -> object:
    (tmp_path / "predict.py").write_text(HEADER + textwrap.dedent(body))
    monkeypatch.chdir(tmp_path)
    return load_predictor(ref)


def rejects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> str:
    with pytest.raises(PredictorError) as info:
        load_source(tmp_path, monkeypatch, body, "predict.py:Predictor")
    return str(info.value)


def predictor(signature: str, returns: str = "str") -> str:
    return f"""
class Predictor(BasePredictor):
    def predict(self, {signature}) -> {returns}:
        raise NotImplementedError
"""


CASES = [
    # --- setup() ---
    (
        "setup_extra_args",
        """
class Predictor(BasePredictor):
    def setup(self, x, y):
        pass
    def predict(self) -> str:
        return ""
""",
        "unexpected setup() arguments: x, y",
    ),
    (
        "setup_varargs",
        """
class Predictor(BasePredictor):
    def setup(self, *args):
        pass
    def predict(self) -> str:
        return ""
""",
        "setup() must not have *args",
    ),
    (
        "setup_varkw",
        """
class Predictor(BasePredictor):
    def setup(self, **kwargs):
        pass
    def predict(self) -> str:
        return ""
""",
        "setup() must not have **kwargs",
    ),
    # --- predict() ---
    ("missing_annotation", predictor("s"), "missing type annotation for input: s"),
    ("predict_varargs", predictor("*args: str"), "predict() must not have *args"),
    ("predict_varkw", predictor("**kwargs: str"), "predict() must not have **kwargs"),
    (
        "predict_no_return_annotation",
        """
class Predictor(BasePredictor):
    def predict(self, s: str):
        return s
""",
        "predict() must have a return type annotation",
    ),
    ("predict_returns_none", predictor("s: str", "None"), "predict() must not return None"),
    (
        "predict_no_self",
        """
class Predictor(BasePredictor):
    def predict(s: str) -> str:
        return s
""",
        "predict() must have 'self' first argument",
    ),
    (
        "run_no_return_annotation",
        """
from cog import BaseRunner
class Predictor(BaseRunner):
    def run(self, s: str):
        return s
""",
        "run() must have a return type annotation",
    ),
    # --- types ---
    (
        "unsupported_type",
        predictor("dt: datetime.datetime"),
        "invalid input field dt: unsupported Cog type datetime",
    ),
    (
        "union_with_path_member",
        predictor("u: Union[Path, str]"),
        "invalid input field u: unsupported union member Path in union Union[cog.types.Path, str]",
    ),
    (
        "union_with_optional_list_member",
        predictor("u: int | list[Optional[int]]"),
        "invalid input field u: unsupported union member list[typing.Optional[int]] in union "
        "int | list[typing.Optional[int]]",
    ),
    (
        "literal_mixed_values",
        "from typing import Literal\n" + predictor("m: Literal['a', 1]"),
        "invalid input field m: unsupported Cog type Literal['a', 1]: "
        "Literal values must be all str or all int",
    ),
    (
        "custom_type_without_coder",
        "class Point:\n    pass\n" + predictor("p: Point"),
        "invalid input field p: unsupported Cog type Point",
    ),
    (
        "enum_not_extending_str",
        """
class Colors(Enum):
    RED = "red"
    BLUE = "blue"
"""
        + predictor("c: Colors"),
        "invalid input field c: enum Colors is used as str but does not extend it",
    ),
    (
        "enum_choice_not_extending_str",
        """
class Colors(Enum):
    RED = "red"
    BLUE = "blue"
"""
        + predictor("c: str = Input(choices=[Colors.RED, Colors.BLUE])"),
        "enum Colors is used as str but does not extend it",
    ),
    # --- Input() options ---
    (
        "ge_on_str",
        predictor("s: str = Input(ge=1)"),
        "incompatible input type for ge/le: s: str",
    ),
    (
        "min_length_on_int",
        predictor("i: int = Input(min_length=1)"),
        "incompatible input type for min_length/max_length: i: int",
    ),
    (
        "regex_on_int",
        predictor("i: int = Input(regex='a')"),
        "incompatible input type for regex: i: int",
    ),
    (
        "default_below_ge",
        predictor("i: int = Input(default=0, ge=10)"),
        "default=0 conflicts with ge=10 for input: i: int",
    ),
    (
        "default_above_le",
        predictor("i: int = Input(default=20, le=10)"),
        "default=20 conflicts with le=10 for input: i: int",
    ),
    (
        "default_too_short",
        predictor("s: str = Input(default='ab', min_length=3)"),
        "default='ab' conflicts with min_length=3 for input: s: str",
    ),
    (
        "default_too_long",
        predictor("s: str = Input(default='abcdef', max_length=3)"),
        "default='abcdef' conflicts with max_length=3 for input: s: str",
    ),
    (
        "default_not_regex_match",
        predictor("s: str = Input(default='foo', regex='bar.*')"),
        "default='foo' not a regex match for input: s: str",
    ),
    (
        "list_default_element_below_ge",
        predictor("xs: List[int] = Input(default=[5, 0], ge=1)"),
        "default=0 conflicts with ge=1 for input: xs: List[int]",
    ),
    (
        "choices_on_float",
        predictor("f: float = Input(choices=[1.0, 2.0])"),
        "incompatible input type for choices: f: float",
    ),
    (
        "choices_too_few",
        predictor("s: str = Input(choices=['a'])"),
        "choices=['a'] must have >= 2 elements: s: str",
    ),
    (
        "choices_with_ge",
        predictor("i: int = Input(choices=[1, 2], ge=1)"),
        "choices and ge/le are mutually exclusive: i: int",
    ),
    (
        "choices_with_length",
        predictor("s: str = Input(choices=['a', 'b'], min_length=1)"),
        "choices and min_length/max_length are mutually exclusive: s: str",
    ),
    (
        "choices_mixed_types",
        predictor("s: str = Input(choices=['a', 2])"),
        "not all choices have the same type as input: s: str",
    ),
    (
        "default_not_in_choices",
        predictor("s: str = Input(default='c', choices=['a', 'b'])"),
        "default='c' is not one of choices ['a', 'b'] for input: s: str",
    ),
    (
        "default_and_factory",
        predictor("xs: List[str] = Input(default=['a'], default_factory=list)"),
        "default and default_factory are mutually exclusive for input: xs: List[str]",
    ),
    (
        "default_none_not_optional",
        predictor("s: str = Input(default=None)"),
        "error-prone usage of default=None for input: s: str",
    ),
    (
        "plain_default_none_not_optional",
        predictor("s: str = None"),
        "error-prone usage of default=None for input: s: str",
    ),
    (
        "default_wrong_type",
        predictor("i: int = Input(default='x')"),
        "default='x' is not a valid int for input: i: int",
    ),
    # --- outputs ---
    ("output_optional", predictor("", "Optional[str]"), "output must not be Optional"),
    ("output_iterator_bare", predictor("", "Iterator"), "iterator type must have a type argument"),
    (
        "output_async_iterator_bare",
        predictor("", "AsyncIterator"),
        "iterator type must have a type argument",
    ),
    (
        "output_concatenate_int",
        predictor("", "ConcatenateIterator[int]"),
        "ConcatenateIterator must have str element",
    ),
    (
        "output_async_concatenate_int",
        predictor("", "AsyncConcatenateIterator[int]"),
        "AsyncConcatenateIterator must have str element",
    ),
    (
        "output_iterator_of_optional",
        predictor("", "Iterator[Optional[str]]"),
        "iterator element type must not be Optional or List",
    ),
    (
        "output_unsupported",
        predictor("", "datetime.datetime"),
        "unsupported Cog type datetime",
    ),
]


@pytest.mark.parametrize(("body", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_rejected_definition(
    body: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert rejects(tmp_path, monkeypatch, body) == message


def test_future_annotations_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "predict.py").write_text(
        "from __future__ import annotations\n" + HEADER + predictor("s: str")
    )
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PredictorError) as info:
        load_predictor("predict.py:Predictor")
    assert str(info.value) == 'predictor with "from __future__ import annotations" is not supported'


def test_future_annotations_after_docstring_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A __future__ import may follow the module docstring and comments, split over lines.
    (tmp_path / "predict.py").write_text(
        '"""My model."""\n# comment\nfrom __future__ import (\n    annotations,\n)\n'
        + HEADER
        + predictor("s: str")
    )
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PredictorError) as info:
        load_predictor("predict.py:Predictor")
    assert str(info.value) == 'predictor with "from __future__ import annotations" is not supported'


@pytest.mark.parametrize(
    ("source", "ref", "message"),
    [
        ("", "predict.py:Missing", "cannot find 'Missing' in predict.py"),
        ("", "nope.py:Predictor", "cannot read predictor file nope.py: No such file or directory"),
        ("", "predict.py", "invalid predictor reference 'predict.py': expected 'file.py:Name'"),
        ("x = 1\n", "predict.py:x", "predict.py:x is not a class or a function"),
        (
            "1/0\n",
            "predict.py:x",
            "error importing predict.py: ZeroDivisionError: division by zero",
        ),
        (
            "class Predictor(BasePredictor):\n    pass\n",
            "predict.py:Predictor",
            "Predictor does not define predict()",
        ),
    ],
)
def test_bad_references(
    source: str, ref: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "predict.py").write_text(HEADER + source)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PredictorError) as info:
        load_predictor(ref)
    assert str(info.value) == message


ACCEPTED = [
    ("optional_default_none", predictor("s: Optional[str] = Input(default=None)")),
    (
        "setup_with_weights",
        """
class Predictor(BasePredictor):
    def setup(self, weights: Optional[Path] = None) -> None:
        self.w = weights
    def predict(self) -> str:
        return ""
""",
    ),
    (
        "setup_extra_arg_with_default",
        """
class Predictor(BasePredictor):
    def setup(self, flag: bool = True) -> None:
        pass
    def predict(self) -> str:
        return ""
""",
    ),
    (
        "enum_choices_extending_str",
        """
class Colors(str, Enum):
    RED = "red"
    BLUE = "blue"
"""
        + predictor("c: str = Input(default=Colors.RED, choices=[Colors.RED, Colors.BLUE])"),
    ),
    ("secret_and_path_lists", predictor("ts: List[Secret], ps: List[Path]")),
    ("pep604_optional", predictor("s: str | None = None, xs: list[int] | None = None")),
    ("list_output", predictor("", "List[Path]")),
    ("opaque_inputs", "from typing import Any\n" + predictor("xs: list, blob: dict, a: Any")),
    # Cog 0.23 serves these (issue 9): unions, nested lists, optional secrets, Literal.
    ("union_typing", predictor("u: Union[int, str], v: Union[str, float, None] = None")),
    ("union_pep604", predictor("u: str | float | None = None, xs: list[int] | list[float] = []")),
    ("nested_list_input", predictor("xs: List[List[int]] = Input(default=[[1, 2], [3]])")),
    ("nested_list_output", predictor("", "List[List[float]]")),
    ("optional_secret", predictor("key: Secret = Input(default=None)")),
    ("literal_choices", "from typing import Literal\n" + predictor("m: Literal['a', 'b'] = 'a'")),
    (
        "json_coder_dicts",
        "from typing import Any\nfrom cog.coder import json_coder\n"
        + predictor("d: dict[str, Any]", "dict[str, Any]"),
    ),
]


@pytest.mark.parametrize("body", [c[1] for c in ACCEPTED], ids=[c[0] for c in ACCEPTED])
def test_accepted_definition(body: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = load_source(tmp_path, monkeypatch, body, "predict.py:Predictor")
    assert loaded.openapi_schema()["components"]["schemas"]["Input"]["type"] == "object"


def test_finding_coders_never_touches_lazy_module_attributes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Coders are looked up in the model's imported modules (as Cog); a lazily importing
    package (transformers-style ``__getattr__``) must not be made to import everything."""
    (tmp_path / "lazypkg.py").write_text(
        textwrap.dedent(
            """
            import sys, types
            class _Lazy(types.ModuleType):
                def __dir__(self):
                    return ["heavy"]
                def __getattr__(self, name):
                    raise RuntimeError(f"lazy import of {name} triggered")
            sys.modules[__name__].__class__ = _Lazy
            """
        )
    )
    body = "import lazypkg\n" + predictor("s: str")
    loaded = load_source(tmp_path, monkeypatch, body, "predict.py:Predictor")
    assert loaded.inputs[0].name == "s"


def test_opaque_and_annotated_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``Annotated[T, cog.Opaque]`` is an opaque JSON object (Cog 0.23); other Annotated
    metadata is ignored."""
    body = (
        "from typing import Annotated\nfrom cog import Opaque\n"
        "class Config:\n    pass\n"
        + predictor(
            "cfg: Annotated[Config, Opaque], items: Annotated[list, Opaque], "
            "maybe: Annotated[Optional[Config], Opaque] = None, "
            "s: Annotated[str, 'documentation only'] = 'x'"
        )
    )
    loaded = load_source(tmp_path, monkeypatch, body, "predict.py:Predictor")
    props = loaded.openapi_schema()["components"]["schemas"]["Input"]["properties"]
    assert props["cfg"]["type"] == "object"
    assert props["items"]["type"] == "array" and props["items"]["items"] == {"type": "object"}
    assert props["maybe"]["type"] == "object" and props["maybe"]["nullable"] is True
    assert props["s"]["type"] == "string"
    kwargs, _ = loaded.prepare_input({"cfg": {"any": ["thing"]}, "items": [{"a": 1}]})
    assert kwargs["cfg"] == {"any": ["thing"]} and kwargs["items"] == [{"a": 1}]
