"""Every stage's rule table covers the ops it must handle, and a missing rule names the op
and the stage (tpcompiler.ir.rules)."""
import importlib
import pkgutil
from dataclasses import dataclass

import pytest

import tpcompiler
from tpcompiler.ir import rules


def _import_all():
    for info in pkgutil.walk_packages(tpcompiler.__path__, "tpcompiler."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)


_import_all()


@pytest.mark.parametrize("stage", sorted(rules.TABLES))
def test_table_covers_its_domain(stage):
    table = rules.TABLES[stage]
    assert table.missing() == [], f"stage {stage!r} lacks rules for {table.missing()}"


def test_missing_rule_names_op_and_stage():
    @dataclass(frozen=True)
    class Mystery:
        kind = "Vec"

    table = rules.RuleTable("test stage for a missing rule")
    try:
        with pytest.raises(rules.MissingRule, match="test stage for a missing rule.*Mystery"):
            table(Mystery())
        assert not isinstance(rules.MissingRule("x"), tpcompiler.ProgramError)
    finally:
        del rules.TABLES[table.stage]


def test_a_rule_is_registered_once():
    table = rules.RuleTable("test stage for double registration")
    try:
        table.register(int)(lambda: 1)
        with pytest.raises(ValueError, match="already has a rule"):
            table.register(int)(lambda: 2)
    finally:
        del rules.TABLES[table.stage]
