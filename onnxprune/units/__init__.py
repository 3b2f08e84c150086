"""Unit kinds (one class each, in a registry), typed units and the plan the cut takes.

Importing the package registers the built-in kinds: attention module, head, QK channel and
VO channel (``attention.py``); KV group of grouped-query attention
(``kv_group.py``); FFN module and FFN channel (``ffn.py``)."""

from onnxprune.units import attention, ffn, kv_group  # noqa: F401  (registers the built-in kinds)
from onnxprune.units.base import (
    BlockBudget,
    Candidate,
    GateSite,
    LabelRoles,
    Unit,
    UnitKind,
    granularity_kinds,
    kinds_of,
    module_kind,
    parse_unit,
    register_kind,
    unit_kind,
    unit_kinds,
)
from onnxprune.units.removal import BlockCut, Plan, block_roles, make_plan, parse_units

__all__ = ["BlockBudget", "BlockCut", "Candidate", "GateSite", "LabelRoles", "Plan", "Unit",
           "UnitKind", "block_roles", "granularity_kinds", "kinds_of", "make_plan", "module_kind",
           "parse_unit", "parse_units", "register_kind", "unit_kind", "unit_kinds"]
