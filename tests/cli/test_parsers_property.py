"""Property-based tests of the parsers users type into: measure specs, TOML configs, model/data specs, globs.

Whatever the text, a parser either returns a well-formed value or raises its
own documented error (never a bare TypeError, KeyError or re.error).
"""

from __future__ import annotations

import argparse
import re
import string
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extract.cli import CommandError, extract_command_parser, plan_extract
from extract.globs import glob_regex
from extract.hooks import LayerSelectionError, resolve_layers
from extract.specs import SpecError, load_data, load_model
from measure import MEASURES, MeasureError
from measure.cli import parse_measure

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

simple_values = st.one_of(
    st.integers(-10**6, 10**6),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.booleans(),
    st.text(alphabet=string.ascii_letters + "_", min_size=1, max_size=8).filter(
        lambda s: s not in ("True", "False", "true", "false", "null", "NaN", "Infinity")),
)


@FAST
@given(st.text(max_size=60))
def test_parse_measure_returns_or_raises_measure_error(text):
    try:
        name, options = parse_measure(text)
    except MeasureError:
        return
    assert name in MEASURES
    assert isinstance(options, dict)


@FAST
@given(st.sampled_from(sorted(MEASURES)),
       st.dictionaries(st.text(alphabet=string.ascii_lowercase + "_", min_size=1, max_size=10), simple_values,
                       max_size=3))
def test_parse_measure_round_trips(name, options):
    def fmt(v):
        return repr(v) if isinstance(v, float) else ("true" if v is True else "false" if v is False else str(v))

    text = f"{name}({', '.join(f'{k}={fmt(v)}' for k, v in options.items())})" if options else name
    parsed_name, parsed = parse_measure(text)
    assert parsed_name == name
    assert parsed.keys() == options.keys()
    for key, value in options.items():
        if isinstance(value, float):
            assert parsed[key] == pytest.approx(value, rel=1e-6, abs=1e-30)
        else:
            assert parsed[key] == value


toml_scalars = st.one_of(st.integers(-5, 10**4), st.booleans(), st.text(max_size=12),
                         st.floats(allow_nan=False, allow_infinity=False))
toml_values = st.recursive(toml_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(string.ascii_lowercase, min_size=1, max_size=6), inner,
                                                 max_size=3)), max_leaves=6)
config_keys = st.sampled_from(["data", "out", "batch_size", "dtype", "device", "no_inputs", "models", "colour"])


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').encode("unicode_escape").decode()
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"


def _namespace(config: str) -> argparse.Namespace:
    parser = extract_command_parser()
    return parser.parse_args(["--config", config])


@FAST
@given(st.dictionaries(config_keys, toml_values, max_size=5))
def test_extract_config_parser_accepts_or_names_the_problem(tmp_path_factory, config):
    path = tmp_path_factory.mktemp("cfg") / "c.toml"
    text = "\n".join(f"{k} = {_toml(v)}" for k, v in config.items())
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return  # our TOML writer cannot express this value; not a case for the parser under test
    path.write_text(text)
    try:
        plan = plan_extract(_namespace(str(path)))
    except CommandError as exc:
        message = str(exc).lower()
        assert any(w in message for w in (str(path).lower(), "model", "key", "batch", "dtype")), message
        return
    assert isinstance(plan.models, list)
    for m in plan.models:
        assert isinstance(m["name"], str) and m["name"]
        assert m["layers"]
    assert isinstance(plan.options.batch_size, int) and plan.options.batch_size > 0
    assert plan.options.dtype in ("float32", "float16")


@FAST
@given(st.text(alphabet=string.printable, max_size=40).filter(lambda s: ":" not in s))
def test_data_and_model_specs_without_module_raise_spec_error(tmp_path_factory, text):
    if text.strip() in ("digits", "digits:test", "digits:train"):
        return
    if text.strip() and Path(text).is_dir():  # an existing folder is an image-folder spec (test_inputs.py)
        return
    missing = str(tmp_path_factory.getbasetemp() / "absent" / text.replace("/", "_"))
    for spec in (text, missing + ".npy", missing + ".pt"):
        with pytest.raises(SpecError):
            load_data(spec)
    with pytest.raises(SpecError):
        load_model(missing + ".pt")


@FAST
@given(st.text(alphabet=string.ascii_letters + string.digits + "_.", min_size=1, max_size=20),
       st.text(alphabet=string.ascii_letters + "_", min_size=1, max_size=10))
def test_specs_naming_missing_modules_raise_spec_error(module, attr):
    spec = f"zz_simtorch_absent_{module}:{attr}"
    with pytest.raises(SpecError):
        load_model(spec)
    with pytest.raises(SpecError):
        load_data(spec)


@FAST
@given(st.text(alphabet=string.ascii_letters + string.digits + "._*?[]!-", min_size=1, max_size=16))
def test_layer_globs_compile_and_match_like_fnmatch_within_a_name_part(pattern):
    regex = glob_regex(pattern)
    assert isinstance(regex, re.Pattern)
    import fnmatch

    for name in ("block1", "layer1.conv1", "fc", "a.b.c", "features.0"):
        if "." not in name and "**" not in pattern and "[" not in pattern:
            assert bool(regex.fullmatch(name)) == fnmatch.fnmatchcase(name, pattern)


@FAST
@given(st.lists(st.text(alphabet=string.ascii_letters + "._*?", min_size=1, max_size=8), min_size=1, max_size=3))
def test_resolve_layers_returns_real_names_or_raises(patterns):
    from torch import nn

    model = nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.ReLU(), nn.Linear(3, 1)))
    names = {n for n, _ in model.named_modules() if n}
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            chosen = resolve_layers(model, patterns)
    except LayerSelectionError:
        return
    assert chosen and set(chosen) <= names
