"""stage_key: the one function that decides whether a stage is up to date."""

from importlib.metadata import version

import pytest

from storage.keys import stage_key, tool_versions
from tasks.recipes import BUILTINS

PARAMS = BUILTINS["qx86-hi"].params()
DIGESTS = ["a" * 64, "b" * 64]
TOOLS = {"mlx": "0.1.0", "mlx-lm": "0.2.0", "lm-eval": "0.3.0"}
BASE = dict(stage="quantize", code_version="1", params=PARAMS, input_digests=DIGESTS, tools=TOOLS)


def key(**change) -> str:
    return stage_key(**{**BASE, **change})


def other(value):
    """A value of the same kind that differs from `value`."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, (list, tuple)):
        return list(value)[:-1]
    return 0 if value is None else None


def test_same_inputs_same_key():
    assert key() == key() == stage_key(**{**BASE, "params": dict(PARAMS), "input_digests": list(DIGESTS)})
    assert len(key()) == 64 and set(key()) <= set("0123456789abcdef")


def test_dict_key_order_does_not_matter():
    reordered = {k: PARAMS[k] for k in reversed(list(PARAMS))}
    reordered["rules"] = [{k: r[k] for k in reversed(list(r))} for r in PARAMS["rules"]]
    assert list(reordered) != list(PARAMS)
    assert key(params=reordered) == key()
    assert key(tools={k: TOOLS[k] for k in reversed(list(TOOLS))}) == key()


@pytest.mark.parametrize("field, value", [("stage", "smoke"), ("code_version", "2")])
def test_stage_and_code_version_change_the_key(field, value):
    assert key(**{field: value}) != key()


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_each_param_changes_the_key(name):
    assert key(params={**PARAMS, name: other(PARAMS[name])}) != key()


def test_param_presence_and_type_change_the_key():
    assert key(params={**PARAMS, "extra": None}) != key()
    assert key(params={**PARAMS, "bits": str(PARAMS["bits"])}) != key()
    rule = {**PARAMS["rules"][0], "bits": 4}
    assert key(params={**PARAMS, "rules": [rule, *PARAMS["rules"][1:]]}) != key()


def test_each_input_digest_and_their_order_change_the_key():
    for i in range(len(DIGESTS)):
        changed = list(DIGESTS)
        changed[i] = "c" * 64
        assert key(input_digests=changed) != key()
    assert key(input_digests=DIGESTS[::-1]) != key()
    assert key(input_digests=DIGESTS[:1]) != key()


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_each_tool_version_changes_the_key(tool):
    assert key(tools={**TOOLS, tool: TOOLS[tool] + ".post1"}) != key()
    assert key(tools={**TOOLS, tool: None}) != key()


def test_installed_tool_versions_are_recorded_and_used_by_default():
    found = tool_versions()
    for name in ("mlx", "mlx-lm", "lm-eval"):
        assert found[name] == version(name)
    assert key(tools=None) == key(tools=dict(found)) != key()
