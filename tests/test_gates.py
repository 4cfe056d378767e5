"""tasks.gates: which quality gates a cell passes, from what it measured."""

from tasks.gates import DEFAULTS, check, describe, failed


def by_gate(rows):
    return {g["gate"]: g for g in rows}


def test_a_good_cell_passes_every_default_gate():
    rows = check({}, "ok", {"kl_mean": 0.02, "ppl_ratio": 1.01})
    assert set(by_gate(rows)) == {"smoke", "max_kl_mean", "max_ppl_ratio"} and not failed(rows)
    assert DEFAULTS == {"smoke": "ok", "max_kl_mean": 1.0, "max_ppl_ratio": 1.5}


def test_a_broken_cell_fails_and_says_by_how_much():
    rows = check({}, "not_language", {"kl_mean": 14.8, "ppl_ratio": 2.7e6})
    assert [g["gate"] for g in failed(rows)] == ["smoke", "max_kl_mean", "max_ppl_ratio"]
    g = by_gate(rows)
    assert (g["max_kl_mean"]["measured"], g["max_kl_mean"]["requirement"]) == ("14.8", "at most 1")
    assert describe(rows) == ("smoke: not_language (required: ok); max_kl_mean: 14.8 (required: at most 1); "
                              "max_ppl_ratio: 2.7e+06 (required: at most 1.5)")


def test_the_limit_itself_passes_and_a_gate_can_be_turned_off():
    assert not failed(check({"max_kl_mean": 0.5}, "ok", {"kl_mean": 0.5, "ppl_ratio": 1.0}))
    rows = check({"smoke": "any", "max_kl_mean": None}, "repetitive", {"kl_mean": 9.0, "ppl_ratio": 1.2})
    assert [g["gate"] for g in rows] == ["max_ppl_ratio"] and not failed(rows)


def test_a_gate_without_its_measurement_fails():
    """Fidelity turned off: the KL and perplexity gates cannot be checked, so they do not let the cell out."""
    rows = check({}, "ok", {})
    assert [g["gate"] for g in failed(rows)] == ["max_kl_mean", "max_ppl_ratio"]
    assert by_gate(rows)["max_kl_mean"]["measured"] == "not measured (fidelity is off)"
