"""Fuzzing of the three places users type text: pp specs, `file.py:k=v` arguments and
`--config.KEY=VALUE` overrides. Any string gives a result or the project's one-line
error (a UserError), never another exception.
"""

import string

from hypothesis import HealthCheck, given, settings, strategies as st

from vitcls import configs
from vitcls.data import pp as pp_lib
from vitcls.errors import UserError

SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

# Text near the grammar finds more than uniform noise: op names, brackets, literals.
_OPS = sorted(pp_lib.available_ops())
_PIECES = st.sampled_from(_OPS + ["(", ")", ",", "|", "=", "'", '"', "[", "]", "{", "}",
                                  "1", "-1", "0.5", "1e999", "None", "True", "key=",
                                  "method=", "'bicubic'", "*", "**", "lambda", "\\", " ",
                                  "\x00", "é", "(" * 50])
_NEAR = st.lists(_PIECES, max_size=12).map("".join)
# Well-formed calls of real ops with arbitrary literal arguments.
_LITERALS = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                      st.text(max_size=8), st.none(), st.booleans(),
                      st.lists(st.integers(-3, 300), max_size=4))
_CALLS = st.lists(st.tuples(
    st.sampled_from(_OPS), st.lists(_LITERALS, max_size=4),
    st.dictionaries(st.sampled_from(["key", "method", "size", "p", "channels", "ops",
                                     "area_min", "x"]), _LITERALS, max_size=2)),
    min_size=1, max_size=3).map(lambda calls: "|".join(
        f"{name}({', '.join([*map(repr, args), *(f'{k}={v!r}' for k, v in kw.items())])})"
        for name, args, kw in calls))
_ANY = st.text(max_size=60)


def _one_line_error(e: Exception) -> None:
  assert isinstance(e, UserError), f"{type(e).__name__}: {e}"
  assert str(e).strip() and "\n" not in str(e).strip(), repr(str(e))


@SETTINGS
@given(st.one_of(_CALLS, _NEAR, _ANY))
def test_pp_spec_parses_or_gives_one_error(spec):
  try:
    result = pp_lib.parse(spec)
  except Exception as e:  # pylint: disable=broad-except
    _one_line_error(e)
  else:
    assert isinstance(result, pp_lib.Preprocess)


_ARG_SPEC = dict(variant="S/16", steps=100, lr=0.1, runlocal=False, names=["a"])


@SETTINGS
@given(st.one_of(
    st.lists(st.tuples(st.sampled_from(sorted(_ARG_SPEC) + ["x", ""]),
                       st.one_of(_NEAR, _ANY, st.sampled_from(
                           ["1", "1.5", "True", "no", "[1,2]", "(", "None", "1e400"]))),
             max_size=4).map(lambda kv: ",".join(f"{k}={v}" for k, v in kv)),
    _ANY))
def test_file_arguments_parse_or_give_one_error(arg):
  try:
    result = configs.parse_arg(arg, **_ARG_SPEC)
  except Exception as e:  # pylint: disable=broad-except
    _one_line_error(e)
  else:
    assert set(result.keys()) == set(_ARG_SPEC)


def _leaf_keys(config, prefix=""):
  for key, value in config.items():
    if isinstance(value, configs.ConfigDict) and value:
      yield from _leaf_keys(value, prefix + key + ".")
    yield prefix + key


_KEYS = sorted(set(_leaf_keys(configs.defaults()))) + [
    "model.width", "evals.test.every", "optax.b1", "expected.val/top1", "expected.a.b",
    "no_such_key",
    "input.data.name.x", "schedule", "evals", ".", "", "model..x"]
_VALUES = st.one_of(_NEAR, _ANY, st.sampled_from(
    ["1", "-3", "0.5", "nan", "inf", "1e999", "True", "false", "None", "[]", "[1, 2]",
     "[('.*', 2.0)]", "{'a': 1}", "{'a.b': 1}", "{'x': {'y': [1]}}", "{1: 2}", "(",
     "'quoted'", "x" * 200]))


@SETTINGS
@given(st.lists(st.tuples(st.one_of(st.sampled_from(_KEYS),
                                    st.text(string.ascii_letters + "._/", max_size=20)),
                          _VALUES), min_size=1, max_size=3))
def test_config_overrides_apply_or_give_one_error(pairs):
  overrides = [f"{k}={v}" for k, v in pairs]
  try:
    result = configs.resolve(configs.ConfigDict(), overrides)
  except Exception as e:  # pylint: disable=broad-except
    _one_line_error(e)
  else:
    assert isinstance(result, configs.ConfigDict)


@SETTINGS
@given(_ANY)
def test_a_bare_override_without_equals_is_one_error(text):
  try:
    configs.resolve(configs.ConfigDict(), [text])
  except Exception as e:  # pylint: disable=broad-except
    _one_line_error(e)
