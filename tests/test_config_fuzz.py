"""Config fuzzing: invalid values never start a run and never end in a traceback without a message
naming the field."""

import dataclasses
import typing

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mimkit.config import Config, ConfigError, load_config

FIELDS = [
    f"{name}.{f.name}"
    for name, cls in typing.get_type_hints(Config).items()
    if dataclasses.is_dataclass(cls)
    for f in dataclasses.fields(cls)
]

values = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.lists(st.integers(-5, 5), max_size=4), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)  # fmt: skip


@settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from(FIELDS), value=values)
def test_any_value_is_accepted_or_rejected_naming_the_field(field, value):
    try:
        load_config(None, method="mae", **{field.split(".")[0]: {field.split(".")[1]: value}})
    except ConfigError as e:
        assert field.split(".")[1] in str(e), f"message does not name {field}: {e}"


@settings(max_examples=100, deadline=None, derandomize=True)
@given(key=st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12))
def test_unknown_keys_are_always_rejected(key):
    known = {f.split(".")[1] for f in FIELDS if f.startswith("train.")}
    if key in known:
        return
    try:
        load_config(None, [f"train.{key}=1"])
    except ConfigError as e:
        assert f"train.{key}" in str(e)
    else:
        raise AssertionError(f"train.{key} was accepted")
