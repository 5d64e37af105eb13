"""Where a named scope's operations sit in a traced program: outside or inside its loops (scan, while)."""
from __future__ import annotations

from typing import Any

import jax
from jax.extend import core as jex_core

LOOPS = ("scan", "while")


def _subjaxprs(value: Any):
    if isinstance(value, jex_core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jex_core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _subjaxprs(v)


def count_scope(jaxpr: Any, scope: str) -> tuple[int, int]:
    """(operations under the name scope `scope` outside every loop, inside a loop body) of a program made by
    jax.make_jaxpr. A scope entered while tracing a loop body shows in that body's operations."""
    counts = [0, 0]

    def walk(j, in_loop: bool) -> None:
        for eqn in j.eqns:
            if scope in str(eqn.source_info.name_stack):
                counts[in_loop] += 1
            inner = in_loop or eqn.primitive.name in LOOPS
            for value in eqn.params.values():
                for sub in _subjaxprs(value):
                    walk(sub, inner)

    walk(jaxpr.jaxpr if hasattr(jaxpr, "jaxpr") else jaxpr, False)
    return counts[0], counts[1]
