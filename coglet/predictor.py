"""Load a model's predictor and check its definition the way Cog does.

``load_predictor("predict.py:Predictor")`` imports the model file (the model directory is the
cwd and on ``sys.path``), checks setup()/predict() and every input and output type against
Cog's rules (each violation is a :class:`PredictorError` whose message is Cog's), and returns
a :class:`LoadedPredictor` the runner drives. Standard library only.
"""

from __future__ import annotations
import __future__

import ast
import copy
import dataclasses
import enum
import importlib.util
import inspect
import io
import os
import re
import shutil
import sys
import tempfile
import typing
from types import ModuleType
from typing import Any, Callable, Dict, List, Optional, Tuple

from cog.coder import Coder
from cog.decorators import STREAMING_ATTR
from cog.input import MISSING, FieldInfo
from cog.predictor import BasePredictor, BaseRunner
from cog.types import SECRET_MASK, File, Path, Secret

from coglet import protocol
from coglet import types as t
from coglet.schema import openapi_schema
from coglet.types import CogType, InputSpec, OutputType
from coglet.validation import InputValidationError, validate_input

__all__ = [
    "InputValidationError",
    "LoadedPredictor",
    "PredictorError",
    "encode_output",
    "load_predictor",
    "set_spill_root",
]


class PredictorError(Exception):
    """A predictor definition Cog rejects; ``str()`` is Cog's message."""


# --- loading -----------------------------------------------------------------------------------
MODE_PREDICT = "predict"
MODE_TRAIN = "train"


def load_predictor(ref: str, *, mode: str = MODE_PREDICT) -> LoadedPredictor:
    """Import ``file.py:Name`` relative to the cwd and check it; PredictorError on any rule.

    ``mode`` ``train`` loads cog.yaml's ``train:`` target: a function, or a class whose
    ``train()`` method is called (after its ``setup()``).
    """
    path, _, name = ref.partition(":")
    if not path or not name:
        raise PredictorError(f"invalid predictor reference {ref!r}: expected 'file.py:Name'")
    module = _import_model_file(path)
    target = getattr(module, name, None)
    if target is None:
        raise PredictorError(f"cannot find {name!r} in {path}")
    _find_coders(module)
    return LoadedPredictor(ref, target, mode=mode)


def _is_coder(obj: Any) -> bool:
    return inspect.isclass(obj) and obj is not Coder and issubclass(obj, Coder)


def _find_coders(module: ModuleType) -> None:
    """Register the coders a model defines or imports, as Cog does: classes in the module,
    and classes in the modules it imports (``from cog.coder import json_coder``).

    Module dicts are read with ``vars()``, never ``getattr``: a lazily importing package
    (``transformers``) would otherwise import every submodule it names.
    """
    for obj in list(vars(module).values()):
        if _is_coder(obj):
            Coder.register(obj)
        elif isinstance(obj, ModuleType):
            for inner in list(vars(obj).values()):
                if _is_coder(inner):
                    Coder.register(inner)


def _uses_future_annotations(source: str) -> bool:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return False  # the import itself reports the syntax error
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            if any(alias.name == "annotations" for alias in node.names):
                return True
    return False


def _module_name(path: str) -> str:
    stem = os.path.splitext(os.path.normpath(path))[0].replace(os.sep, ".")
    valid = all(part.isidentifier() for part in stem.split("."))
    if valid and stem not in sys.modules:
        return stem
    return "cog_predictor_" + re.sub(r"\W", "_", stem)


# One module per file: cog.yaml's predict: and train: may name the same file.
_MODULES: Dict[str, ModuleType] = {}


def _import_model_file(path: str) -> ModuleType:
    full = os.path.join(os.getcwd(), path)
    module = _MODULES.get(full)
    if module is None:
        module = _MODULES[full] = _import_new_model_file(path)
    return module


def _import_new_model_file(path: str) -> ModuleType:
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    full = os.path.join(cwd, path)
    try:
        with open(full, encoding="utf-8") as f:
            source = f.read()
    except OSError as e:
        raise PredictorError(f"cannot read predictor file {path}: {e.strerror}") from e
    if _uses_future_annotations(source):
        raise PredictorError('predictor with "from __future__ import annotations" is not supported')
    name = _module_name(path)
    spec = importlib.util.spec_from_file_location(name, full)
    if spec is None or spec.loader is None:
        raise PredictorError(f"cannot import predictor file {path}")
    module = importlib.util.module_from_spec(spec)
    # Registered before exec: dataclasses and typing look the module up by name.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        raise PredictorError(f"error importing {path}: {type(e).__name__}: {e}") from e
    if getattr(module, "annotations", None) is __future__.annotations:
        raise PredictorError('predictor with "from __future__ import annotations" is not supported')
    return module


# --- the definition rules ----------------------------------------------------------------------
def _overrides(cls: type, method: str, base: type) -> bool:
    return getattr(cls, method, None) is not getattr(base, method, None)


def _predict_method(cls: type) -> Tuple[str, Callable[..., Any]]:
    """``run`` for BaseRunner subclasses (and classes with only run), else ``predict``."""
    has_run = hasattr(cls, "run") and (
        not issubclass(cls, BaseRunner) or _overrides(cls, "run", BaseRunner)
    )
    has_predict = hasattr(cls, "predict") and (
        not issubclass(cls, BasePredictor) or _overrides(cls, "predict", BasePredictor)
    )
    if issubclass(cls, BaseRunner) and has_run:
        return "run", cls.run
    if has_predict:
        return "predict", cls.predict  # type: ignore[attr-defined]
    if has_run:
        return "run", cls.run  # type: ignore[attr-defined]
    raise PredictorError(f"{cls.__name__} does not define predict()")


def _train_method(cls: type) -> Tuple[str, Callable[..., Any]]:
    """A training class's ``train()`` (run after its ``setup()``)."""
    fn = getattr(cls, "train", None)
    if fn is None:
        raise PredictorError(f"{cls.__name__} does not define train()")
    return "train", fn


def _check_setup(setup: Any) -> bool:
    """Check setup()'s signature; True when it takes ``weights``."""
    if not inspect.isfunction(setup):
        raise PredictorError("setup is not a function")
    params = list(inspect.signature(setup).parameters.values())
    if not params or params[0].name != "self":
        raise PredictorError("setup() must have 'self' first argument")
    rest = params[1:]
    for p in rest:
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            raise PredictorError("setup() must not have *args")
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            raise PredictorError("setup() must not have **kwargs")
    unexpected = [
        p.name for p in rest if p.name != "weights" and p.default is inspect.Parameter.empty
    ]
    if unexpected:
        raise PredictorError(f"unexpected setup() arguments: {', '.join(unexpected)}")
    return any(p.name == "weights" for p in rest)


def _check_signature(fn: Callable[..., Any], fname: str, is_method: bool) -> List[Any]:
    """The input parameters of predict()/run(), after the structural rules."""
    if not (inspect.isfunction(fn) or inspect.ismethod(fn)):
        raise PredictorError(f"{fname} is not a function")
    params = list(inspect.signature(fn).parameters.values())
    if is_method:
        if not params or params[0].name != "self":
            raise PredictorError(f"{fname}() must have 'self' first argument")
        params = params[1:]
    for p in params:
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            raise PredictorError(f"{fname}() must not have *args")
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            raise PredictorError(f"{fname}() must not have **kwargs")
        if p.kind is inspect.Parameter.KEYWORD_ONLY:
            raise PredictorError(f"{fname}() must not have keyword-only args")
    return params


def _type_hints(fn: Callable[..., Any]) -> Dict[str, Any]:
    try:
        # With Annotated kept: ``Annotated[T, cog.Opaque]`` means an opaque object.
        return typing.get_type_hints(fn, include_extras=True)
    except Exception as e:
        raise PredictorError(f"cannot resolve type annotations: {type(e).__name__}: {e}") from e


def _output_type(hints: Dict[str, Any], fn: Callable[..., Any], fname: str) -> OutputType:
    if "return" not in getattr(fn, "__annotations__", {}):
        raise PredictorError(f"{fname}() must have a return type annotation")
    returns = hints.get("return")
    if returns is None or returns is type(None):
        raise PredictorError(f"{fname}() must not return None")
    try:
        return t.resolve_output(returns)
    except ValueError as e:
        raise PredictorError(str(e)) from None


def _input_spec(order: int, param: Any, hints: Dict[str, Any]) -> InputSpec:
    name = param.name
    if name not in hints:
        raise PredictorError(f"missing type annotation for input: {name}")
    try:
        ct = t.resolve_type(hints[name])
    except ValueError as e:
        raise PredictorError(f"invalid input field {name}: {e}") from None
    info = param.default
    if info is inspect.Parameter.empty:
        info = FieldInfo()
    elif not isinstance(info, FieldInfo):
        info = FieldInfo(default=info)
    return _check_options(order, name, ct, info)


def _primitive_of(ct: CogType) -> type:
    return {t.STR: str, t.INT: int, t.FLOAT: float}.get(ct.kind, str)


def _normalize_choice(value: Any, elem: CogType) -> Any:
    """An Enum member used as a choice or default stands for its value."""
    if isinstance(value, enum.Enum) and not isinstance(value, bool):
        primitive = _primitive_of(elem)
        if not isinstance(value, primitive):
            raise PredictorError(
                f"enum {type(value).__name__} is used as {primitive.__name__} "
                "but does not extend it"
            )
        return value.value
    return value


def _check_options(order: int, name: str, ct: CogType, info: FieldInfo) -> InputSpec:
    """Input(...)'s options against the type, with Cog's messages."""
    in_repr = f"{name}: {ct.name()}"
    elem = ct.element
    if info.default is not MISSING and info.default_factory is not None:
        raise PredictorError(
            f"default and default_factory are mutually exclusive for input: {in_repr}"
        )
    if info.default is None and not ct.is_optional and ct.kind != t.SECRET:
        # ``key: Secret = Input(default=None)`` is an optional secret (Cog 0.23 serves it).
        raise PredictorError(f"error-prone usage of default=None for input: {in_repr}")
    has_range = info.ge is not None or info.le is not None
    has_length = info.min_length is not None or info.max_length is not None
    if has_range and elem.kind not in (t.INT, t.FLOAT):
        raise PredictorError(f"incompatible input type for ge/le: {in_repr}")
    if has_length and elem.kind != t.STR:
        raise PredictorError(f"incompatible input type for min_length/max_length: {in_repr}")
    if info.regex is not None:
        if elem.kind != t.STR:
            raise PredictorError(f"incompatible input type for regex: {in_repr}")
        try:
            re.compile(info.regex)
        except re.error as e:
            raise PredictorError(
                f"invalid regex {info.regex!r} for input: {in_repr}: {e}"
            ) from None
    choices = _check_choices(info, elem, in_repr, has_range, has_length)
    spec = InputSpec(
        name=name,
        order=order,
        type=ct,
        default=_normalize_default(info.default, elem),
        default_factory=info.default_factory,
        description=info.description,
        ge=info.ge,
        le=info.le,
        min_length=info.min_length,
        max_length=info.max_length,
        regex=info.regex,
        choices=choices,
        deprecated=info.deprecated,
    )
    _check_default(spec, in_repr)
    return spec


def _normalize_default(default: Any, elem: CogType) -> Any:
    if elem.enum_values is not None:
        return default  # an Enum-typed input keeps its members
    if isinstance(default, list):
        return [_normalize_choice(v, elem) for v in default]
    return _normalize_choice(default, elem)


def _check_choices(
    info: FieldInfo, elem: CogType, in_repr: str, has_range: bool, has_length: bool
) -> Optional[Tuple[Any, ...]]:
    if info.choices is None:
        return None
    if elem.kind not in (t.STR, t.INT):
        raise PredictorError(f"incompatible input type for choices: {in_repr}")
    if len(info.choices) < 2:
        raise PredictorError(f"choices={info.choices!r} must have >= 2 elements: {in_repr}")
    if has_range:
        raise PredictorError(f"choices and ge/le are mutually exclusive: {in_repr}")
    if has_length:
        raise PredictorError(f"choices and min_length/max_length are mutually exclusive: {in_repr}")
    values = [_normalize_choice(c, elem) for c in info.choices]
    primitive = _primitive_of(elem)
    if not all(type(v) is primitive for v in values):
        raise PredictorError(f"not all choices have the same type as input: {in_repr}")
    return tuple(values)


def _default_leaves(spec: InputSpec) -> List[Tuple[Any, CogType]]:
    """The default's scalar values with the type each must have (lists walked, any depth)."""
    if spec.default_factory is not None:
        value = spec.default_factory()
    elif spec.default is MISSING or spec.default is None:
        return []
    else:
        value = spec.default
    leaves: List[Tuple[Any, CogType]] = []
    _collect_leaves(spec.name, value, spec.type, leaves)
    return leaves


def _collect_leaves(name: str, value: Any, ct: CogType, out: List[Tuple[Any, CogType]]) -> None:
    if ct.kind == t.OPTIONAL and ct.item is not None:
        if value is not None:
            _collect_leaves(name, value, ct.item, out)
        return
    if ct.kind == t.LIST and ct.item is not None:
        if not isinstance(value, (list, tuple)):
            raise PredictorError(f"default={value!r} is not a list for input: {name}")
        for item in value:
            _collect_leaves(name, item, ct.item, out)
        return
    out.append((value, ct))


def _check_default(spec: InputSpec, in_repr: str) -> None:
    for value, elem in _default_leaves(spec):
        if not _matches_type(value, elem):
            raise PredictorError(
                f"default={value!r} is not a valid {elem.name()} for input: {in_repr}"
            )
        if isinstance(value, enum.Enum):
            value = value.value
        if spec.ge is not None and value < spec.ge:
            raise PredictorError(
                f"default={value!r} conflicts with ge={spec.ge} for input: {in_repr}"
            )
        if spec.le is not None and value > spec.le:
            raise PredictorError(
                f"default={value!r} conflicts with le={spec.le} for input: {in_repr}"
            )
        _check_default_string(spec, value, in_repr)
        if spec.choices is not None and value not in spec.choices:
            raise PredictorError(
                f"default={value!r} is not one of choices {list(spec.choices)!r} "
                f"for input: {in_repr}"
            )


def _check_default_string(spec: InputSpec, value: Any, in_repr: str) -> None:
    if spec.min_length is not None and len(value) < spec.min_length:
        raise PredictorError(
            f"default={value!r} conflicts with min_length={spec.min_length} for input: {in_repr}"
        )
    if spec.max_length is not None and len(value) > spec.max_length:
        raise PredictorError(
            f"default={value!r} conflicts with max_length={spec.max_length} for input: {in_repr}"
        )
    if spec.regex is not None and re.match(spec.regex, value) is None:
        raise PredictorError(f"default={value!r} not a regex match for input: {in_repr}")


def _matches_type(value: Any, ct: CogType) -> bool:
    """Whether a Python default fits its declared type (shallow for objects)."""
    if ct.enum_values is not None:
        return (ct.py is not None and isinstance(value, ct.py)) or value in ct.enum_values
    kind = ct.kind
    if kind == t.UNION:
        return any(_matches_type(value, v) for v in ct.variants)
    if kind == t.OPTIONAL and ct.item is not None:
        return value is None or _matches_type(value, ct.item)
    if kind == t.LIST and ct.item is not None:
        item = ct.item
        return isinstance(value, (list, tuple)) and all(_matches_type(v, item) for v in value)
    if kind == t.DICT:
        return isinstance(value, dict)
    if kind == t.BOOL:
        return isinstance(value, bool)
    if kind == t.INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == t.FLOAT:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind in (t.STR,):
        return isinstance(value, str)
    if kind in (t.PATH, t.FILE):
        return isinstance(value, (str, os.PathLike, io.IOBase))
    if kind == t.SECRET:
        return isinstance(value, (str, Secret))
    return True


# --- coercion of validated JSON values to Python -----------------------------------------------
def _coerce(value: Any, ct: CogType) -> Any:
    if value is None:
        return None
    kind = ct.kind
    if kind == t.OPTIONAL and ct.item is not None:
        return _coerce(value, ct.item)
    if kind == t.LIST and ct.item is not None:
        return [_coerce(v, ct.item) for v in value]
    if kind == t.DICT and ct.item is not None:
        return {k: _coerce(v, ct.item) for k, v in value.items()}
    if kind == t.OBJECT:
        return _coerce_object(value, ct)
    if kind == t.CUSTOM:
        return ct.coder.decode(value)
    if kind == t.UNION:
        return value  # the validator chose the member and kept (or widened) the wire type
    if ct.enum_values is not None:
        return value if ct.py is None else ct.py(value)
    if kind == t.FLOAT:
        return float(value)
    if kind == t.PATH:
        return _coerce_path(value, ct.py)
    if kind == t.FILE:
        return File.validate(value)
    if kind == t.SECRET:
        return value if isinstance(value, Secret) else Secret(value)
    return value


def _coerce_path(value: Any, cls: Any) -> Any:
    if isinstance(value, os.PathLike) and (cls is None or isinstance(value, cls)):
        return value
    if cls is None or cls is os.PathLike or inspect.isabstract(cls) or cls is Path:
        return Path(os.fspath(value))
    return cls(os.fspath(value))


def _coerce_object(value: Dict[str, Any], ct: CogType) -> Any:
    fields = ct.field_map()
    kwargs = {k: _coerce(v, fields[k]) if k in fields else v for k, v in value.items()}
    if ct.py is not None and (dataclasses.is_dataclass(ct.py) or not issubclass(ct.py, dict)):
        return ct.py(**kwargs)
    return kwargs


# --- encoding outputs to JSON ------------------------------------------------------------------
def encode_output(value: Any) -> Any:
    """A prediction output (or one iterator item) as JSON-able data.

    Paths become ``{PATH_MARKER: absolute path}`` for the pool to upload or inline; file
    objects are first written to a temporary file; Secrets are masked.
    """
    if isinstance(value, enum.Enum):
        return encode_output(value.value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return value
    if isinstance(value, Secret):
        return SECRET_MASK
    if isinstance(value, os.PathLike):
        return {protocol.PATH_MARKER: os.path.abspath(os.fspath(value))}
    if isinstance(value, io.IOBase):
        return {protocol.PATH_MARKER: _spill_file(value)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: encode_output(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        if protocol.PATH_MARKER in value:
            # Only a real Path or file may make the pool read a file: a dict a model echoes
            # from its input must never name one.
            raise TypeError(f"output dict key {protocol.PATH_MARKER!r} is reserved")
        return {str(k): encode_output(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [encode_output(v) for v in value]
    names = t.pydantic_fields(type(value))
    if names is not None:  # a model's own pydantic output (Cog 0.23 takes them)
        return {name: encode_output(getattr(value, name)) for name in names}
    tolist = getattr(value, "tolist", None)  # numpy arrays and scalars, without importing numpy
    if callable(tolist):
        return encode_output(tolist())
    raise TypeError(f"cannot encode output of type {type(value).__name__}")


_spill_root: Optional[str] = None


def set_spill_root(directory: Optional[str]) -> None:
    """Where returned file objects are copied: the runner's private temporary root, the only
    place the pool removes files from (None: the system's temporary directory)."""
    global _spill_root
    _spill_root = directory


def _spill_file(f: io.IOBase) -> str:
    """Write a file object's content to a fresh temporary file; return its path."""
    name = os.path.basename(str(getattr(f, "name", "") or "")) or "output"
    directory = tempfile.mkdtemp(prefix=protocol.SPILL_DIR_PREFIX, dir=_spill_root)
    path = os.path.join(directory, name)
    if f.seekable():
        f.seek(0)
    with open(path, "wb") as out:
        shutil.copyfileobj(f, out)
    return path


# --- the loaded predictor ----------------------------------------------------------------------
class LoadedPredictor:
    """A checked predictor, ready for the runner: setup, inputs, predict, outputs."""

    def __init__(self, ref: str, target: Any, *, mode: str = MODE_PREDICT) -> None:
        self.ref = ref
        self.mode = mode
        self.instance: Any = None
        self._setup: Optional[Callable[..., Any]] = None
        self._setup_takes_weights = False
        self._setup_ran = False
        if inspect.isclass(target):
            self.method_name, fn = (
                _train_method(target) if mode == MODE_TRAIN else _predict_method(target)
            )
            if _overrides(target, "setup", object) and hasattr(target, "setup"):
                self._setup_takes_weights = _check_setup(target.setup)
            params = _check_signature(fn, self.method_name, is_method=True)
        elif inspect.isfunction(target):
            self.method_name, fn = target.__name__, target
            params = _check_signature(fn, self.method_name, is_method=False)
        else:
            raise PredictorError(f"{ref} is not a class or a function")
        hints = _type_hints(fn)
        self.output: OutputType = _output_type(hints, fn, self.method_name)
        self.inputs: List[InputSpec] = [_input_spec(i, p, hints) for i, p in enumerate(params)]
        self.is_async = inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)
        self.is_iterator = self.output.iterator is not None
        self.is_concatenate = self.output.iterator == t.ITER_CONCATENATE
        # ``@cog.streaming`` marks the function; the pool offers SSE only for such models.
        self.is_streaming = bool(getattr(fn, STREAMING_ATTR, False))
        self._has_custom = _has_custom(self.output.type)
        self._schema = openapi_schema(self.inputs, self.output)
        self.healthcheck: Optional[Callable[[], Any]] = None
        if inspect.isclass(target):
            self.instance = target()
            self._predict: Callable[..., Any] = getattr(self.instance, self.method_name)
            self._setup = getattr(self.instance, "setup", None)
            check = getattr(self.instance, "healthcheck", None)
            self.healthcheck = check if callable(check) else None
        else:
            self._predict = fn

    def openapi_schema(self) -> Dict[str, Any]:
        """Cog's OpenAPI document for this model (a fresh copy; paths left empty)."""
        return copy.deepcopy(self._schema)

    def setup(self) -> object:
        """Run the model's setup(); returns its result (an awaitable for ``async def``)."""
        if self._setup is None:
            return None
        if self._setup_takes_weights:
            return self._setup(weights=_resolve_weights())
        return self._setup()

    @property
    def needs_setup(self) -> bool:
        """True until :meth:`setup_done` (a trainer's setup() runs at its first training)."""
        return self._setup is not None and not self._setup_ran

    def setup_done(self) -> None:
        """setup() has completed (a failed one is tried again next time)."""
        self._setup_ran = True

    def prepare_input(self, raw: Dict[str, Any]) -> Tuple[Dict[str, Any], List[str]]:
        """Validate ``raw`` (InputValidationError), coerce to Python types, fill defaults."""
        values, warnings = validate_input(self._schema, raw)
        kwargs: Dict[str, Any] = {}
        for spec in self.inputs:
            if spec.name in raw:
                kwargs[spec.name] = _coerce(values[spec.name], spec.type)
            else:
                kwargs[spec.name] = _fresh_default(spec)
        return kwargs, warnings

    def predict(self, kwargs: Dict[str, Any]) -> object:
        """Call predict()/run(): a value, an iterator, a coroutine or an async iterator."""
        return self._predict(**kwargs)

    def encode_output(self, value: Any) -> Any:
        """The output (or one iterator item) as JSON-able data; see :func:`encode_output`.

        Values of types a ``cog.coder.Coder`` handles go through its ``encode()`` first.
        """
        if self._has_custom:
            value = _apply_coders(value, self.output.type)
        return encode_output(value)


def _has_custom(ct: CogType) -> bool:
    if ct.kind == t.CUSTOM:
        return True
    if ct.item is not None and _has_custom(ct.item):
        return True
    return any(_has_custom(ft) for _, ft in ct.fields) or any(_has_custom(v) for v in ct.variants)


def _apply_coders(value: Any, ct: CogType) -> Any:
    """``value`` with each part of a coder-handled type replaced by the coder's JSON."""
    if value is None:
        return None
    if ct.kind == t.CUSTOM:
        return ct.coder.encode(value)
    if ct.kind == t.OPTIONAL and ct.item is not None:
        return _apply_coders(value, ct.item)
    if ct.kind in (t.LIST, t.DICT) and ct.item is not None:
        if isinstance(value, dict):
            return {k: _apply_coders(v, ct.item) for k, v in value.items()}
        return [_apply_coders(v, ct.item) for v in value]
    if ct.kind == t.OBJECT and dataclasses.is_dataclass(value) and not isinstance(value, type):
        types = ct.field_map()
        return {
            f.name: _apply_coders(getattr(value, f.name), types[f.name])
            if f.name in types
            else getattr(value, f.name)
            for f in dataclasses.fields(value)
        }
    return value


def _fresh_default(spec: InputSpec) -> Any:
    """Each prediction gets its own copy: a model that mutates a default list must not leak."""
    if spec.default_factory is not None:
        value = spec.default_factory()
    elif spec.default is MISSING:
        return None
    else:
        value = copy.deepcopy(spec.default)
    return _coerce_default(value, spec.type)


def _coerce_default(value: Any, ct: CogType) -> Any:
    if value is None:
        return None
    if ct.kind == t.OPTIONAL and ct.item is not None:
        return _coerce_default(value, ct.item)
    if ct.kind == t.LIST and ct.item is not None and isinstance(value, (list, tuple)):
        return [_coerce_default(v, ct.item) for v in value]
    if ct.enum_values is not None or ct.kind in (t.OBJECT, t.DICT):
        if isinstance(value, ct.py or ()):
            return value
        return _coerce(value, ct) if ct.enum_values is not None else value
    if ct.kind in (t.PATH, t.FILE, t.SECRET, t.FLOAT):
        return _coerce(value, ct)
    return value


def _resolve_weights() -> Any:
    """COG_WEIGHTS (a URL stays a string), else ./weights when it exists, else None."""
    env = os.environ.get("COG_WEIGHTS")
    if env:
        return env if re.match(r"^[a-z][a-z0-9+.-]*://", env) else Path(env)
    if os.path.exists("weights"):
        return Path("weights")
    return None
