"""JSON schemas to the GBNF grammars that constrain the engine's decoding (`response_format`).

The conversion is llama.cpp's own (its json-schema-to-grammar, as llama-cpp-python ships it).
A schema keyword it would not enforce is refused rather than ignored: the output must match the
schema, not only look like it.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

from ...protocol.messages import MAX_GRAMMAR_BYTES

# JSON Schema's validation keywords that the converter ignores: a schema using one is refused.
NOT_ENFORCED = frozenset(
    {
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "multipleOf",
        "uniqueItems",
        "contains",
        "minContains",
        "maxContains",
        "minProperties",
        "maxProperties",
        "patternProperties",
        "propertyNames",
        "dependentRequired",
        "dependentSchemas",
        "dependencies",
        "additionalItems",
        "unevaluatedProperties",
        "unevaluatedItems",
        "not",
        "if",
        "then",
        "else",
        "oneOf",  # converted as anyOf: an output matching two alternatives would be invalid
        "allOf",  # only the parts' properties are kept
    }
)
# Where a schema holds more schemas.
SCHEMA_MAPS = ("properties", "$defs", "definitions")
SCHEMA_LISTS = ("anyOf", "prefixItems")
SCHEMA_VALUES = ("items", "additionalProperties")
# A JSON string's character: the converter's own allows raw control characters, which JSON
# does not (json.loads refuses a newline inside a string).
JSON_CHAR = r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'


@functools.cache
def _converter() -> ModuleType:
    """llama-cpp-python's `llama_grammar` module, loaded from its file as a module of its own:
    it needs only the standard library, while `import llama_cpp.llama_grammar` would run
    llama_cpp's __init__, which loads llama.cpp's libraries and numpy into this process (0.4 s
    and tens of MB) for nothing. Being this process's own copy, its rules can be corrected."""
    package = importlib.util.find_spec("llama_cpp")  # finds the package without importing it
    if package is None or not package.submodule_search_locations:
        raise RuntimeError("llama-cpp-python is not installed")
    path = Path(next(iter(package.submodule_search_locations))) / "llama_grammar.py"
    spec = importlib.util.spec_from_file_location("inferencecenter_llama_grammar", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.PRIMITIVE_RULES["char"] = module.BuiltinRule(JSON_CHAR, [])
    return module


def check_schema(schema: Any, where: str = "schema") -> None:
    """ValueError naming the first keyword the grammar would not enforce."""
    if not isinstance(schema, dict):
        raise ValueError(f"{where} must be an object")
    for key in schema:
        if key in NOT_ENFORCED:
            raise ValueError(f"{where} uses {key!r}, which this server cannot enforce")
    for key in SCHEMA_MAPS:
        children = schema.get(key, {})
        if not isinstance(children, dict):
            raise ValueError(f"{where}.{key} must be an object")
        for name, child in children.items():
            check_schema(child, f"{where}.{key}.{name}")
    for key in SCHEMA_LISTS:
        children = schema.get(key, [])
        if not isinstance(children, list):
            raise ValueError(f"{where}.{key} must be a list")
        for index, child in enumerate(children):
            check_schema(child, f"{where}.{key}[{index}]")
    for key in SCHEMA_VALUES:
        child = schema.get(key)
        if isinstance(child, list):  # `items` as a list: the tuples of older drafts
            for index, item in enumerate(child):
                check_schema(item, f"{where}.{key}[{index}]")
        elif child is not None and not isinstance(child, bool):
            check_schema(child, f"{where}.{key}")


def schema_grammar(schema: Any) -> str:
    """GBNF for JSON text that matches `schema`; ValueError for a schema it cannot be made for."""
    try:
        check_schema(schema)
        grammar: str = _converter().json_schema_to_gbnf(json.dumps(schema))
    except RecursionError:
        raise ValueError("the schema is nested too deeply") from None
    except ValueError:
        raise
    except Exception as exc:  # the converter asserts, and fails on what it does not expect
        raise ValueError(f"the schema cannot be converted to a grammar: {exc}") from None
    if len(grammar.encode()) > MAX_GRAMMAR_BYTES:
        raise ValueError(f"the schema's grammar is over {MAX_GRAMMAR_BYTES} bytes")
    return grammar


def object_grammar() -> str:
    """`json_object`: any JSON object."""
    return schema_grammar({"type": "object"})
