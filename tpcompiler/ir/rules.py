"""Rule tables: what each op means at one stage of the pipeline, keyed by op type.

Every stage that gives ops a meaning (validation, finite-width interpretation, the Master
theorem, the backward pass, printing, each evaluator) keeps one ``RuleTable``, as JAX keeps
one rule dictionary per primitive and interpreter.  Adding an op to ``ir.ops`` means adding
one entry per table; a table that lacks the entry raises ``MissingRule`` naming the op and
the stage, and ``tests/test_rules.py`` checks every table against its declared domain.

    VALIDATE = RuleTable("validation", domain=ops.INSTRUCTIONS)

    @VALIDATE.register(ops.MatMul)
    def _validate_matmul(graph, key, op, args): ...

    VALIDATE(op)(graph, key, op, args)      # look up by type(op), then call
"""
from __future__ import annotations

from typing import Callable, Iterable

#: Every table ever made, by stage name (for the coverage test and for error messages).
TABLES: dict[str, "RuleTable"] = {}


class MissingRule(NotImplementedError):
    """A stage has no rule for an op: a gap in the compiler, not a mistake in the program."""


class RuleTable:
    """The rules of one stage: ``{op type: function}``.

    ``domain`` lists the op types the stage must handle (``tests/test_rules.py`` checks that
    each has a rule); ops outside the domain may still be registered."""

    def __init__(self, stage: str, domain: Iterable[type] = ()):
        if stage in TABLES:
            raise ValueError(f"a rule table for stage {stage!r} already exists")
        self.stage = stage
        self.domain = tuple(domain)
        self.rules: dict[type, Callable] = {}
        TABLES[stage] = self

    def register(self, *op_types: type) -> Callable[[Callable], Callable]:
        """Decorator: the decorated function is the rule for each of ``op_types``."""

        def decorate(rule: Callable) -> Callable:
            for op_type in op_types:
                if op_type in self.rules:
                    raise ValueError(f"{self.stage}: {op_type.__name__} already has a rule")
                self.rules[op_type] = rule
            return rule

        return decorate

    def __call__(self, op) -> Callable:
        """The rule for ``op`` (an op instance or an op type)."""
        op_type = op if isinstance(op, type) else type(op)
        try:
            return self.rules[op_type]
        except KeyError:
            raise MissingRule(
                f"the {self.stage} stage has no rule for op {op_type.__name__}; "
                f"register one with @<table>.register(ops.{op_type.__name__})"
            ) from None

    def __contains__(self, op) -> bool:
        return (op if isinstance(op, type) else type(op)) in self.rules

    def missing(self) -> list[str]:
        """Names of op types in the domain without a rule (empty when the table is complete)."""
        return [t.__name__ for t in self.domain if t not in self.rules]
