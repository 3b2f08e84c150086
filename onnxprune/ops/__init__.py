"""Op rules and attention forms, one file per op family or attention form. Importing the
package imports every module in it, and each module registers its rules and forms, so a new
family or form is one new file here. See ``registry.py`` for how to write one."""

import importlib
import pkgutil

from onnxprune.ops.registry import (
    AttentionAnchors,
    AttentionForm,
    LabelEngine,
    OpRule,
    Surgeon,
    form_for,
    qualified_op,
    register,
    register_form,
    require_rule,
    rule_for,
    unregister,
)

for _module in pkgutil.iter_modules(__path__):  # sorted by file name: a stable order
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["AttentionAnchors", "AttentionForm", "LabelEngine", "OpRule", "Surgeon",
           "form_for", "qualified_op", "register", "register_form", "require_rule",
           "rule_for", "unregister"]
