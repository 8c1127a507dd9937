"""Configuration: JSON-Schema validation with defaults, errors that name the key, input-mode checks."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import yaml

from . import schema
from .errors import BrainfuseError
from .layout import LabelError, check_label

DEFAULT_CONFIG = schema.REPO / "config" / "config.yaml"


class ConfigError(BrainfuseError):
    """A configuration value that brainfuse cannot run with; the message names the key."""


def _with_defaults(validator_class):
    """A validator that fills in ``default`` values before checking (the jsonschema FAQ recipe)."""
    validate_props = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_props(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


_Validator = _with_defaults(jsonschema.Draft202012Validator)


def load_schema() -> dict:
    return schema.load()


def _key(error) -> str:
    path = [str(p) for p in error.absolute_path]
    if error.validator == "additionalProperties":
        # The offending key is in the message, not the path: name it in full.
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        path += extra[:1]
    return ".".join(path) or "<top level>"


_SCALAR_TYPES = {"integer": int, "number": (int, float), "boolean": bool, "null": type(None),
                 "array": list, "object": dict}


def _coerce(value, schema: dict):
    """Strings where the schema wants another type, read as YAML: ``--config demo={n_subjects: 4}`` reaches
    the workflow with every nested value a string (Snakemake parses nested values with YAML's BaseLoader)."""
    types = schema.get("type", [])
    types = [types] if isinstance(types, str) else types
    if isinstance(value, str) and types and "string" not in types:
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            return value
        wanted = tuple(_SCALAR_TYPES[t] for t in types if t in _SCALAR_TYPES)
        if isinstance(parsed, wanted) and (not isinstance(parsed, bool) or "boolean" in types):
            value = parsed
    if isinstance(value, dict):
        props, extra = schema.get("properties", {}), schema.get("additionalProperties")
        return {k: _coerce(v, props.get(k, extra if isinstance(extra, dict) else {})) for k, v in value.items()}
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [_coerce(v, schema["items"]) for v in value]
    return value


def validate(config: dict) -> dict:
    """Return a validated copy of ``config`` with defaults filled in, or raise ConfigError."""
    schema = load_schema()
    config = _coerce(copy.deepcopy(dict(config)), schema)
    errors = sorted(_Validator(schema).iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"  config key '{_key(e)}': {e.message}" for e in errors]
        raise ConfigError("invalid configuration:\n" + "\n".join(lines))
    if config["bids_dir"] and config["dicom_dir"]:
        raise ConfigError("config keys 'bids_dir' and 'dicom_dir' are both set: give one input (or neither, for the demo)")
    try:
        config["subjects"] = [check_label(s, "subject label") for s in config["subjects"]]
    except LabelError as e:
        raise ConfigError(f"config key 'subjects': {e}") from None
    return config


def settings_from_json(text: str | dict) -> dict:
    """The config's ``model`` and ``cv`` sections with schema defaults filled in."""
    given = json.loads(text) if isinstance(text, str) else dict(text)
    full = validate({"model": given.get("model", {}), "cv": given.get("cv", {})})
    return {"model": full["model"], "cv": full["cv"]}


def read_yaml(path) -> dict:
    """A YAML config file as a dict, or ConfigError naming the file, line and column (Snakemake's own loader
    names neither). Tabs get their own advice: YAML never indents with them, and they do not show in an editor."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read the config file ({e.strerror or e})", path=path,
                          fix="check the path") from None
    except UnicodeDecodeError:
        raise ConfigError("not a text (UTF-8) file", path=path, fix="give a YAML config file") from None
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = (getattr(e, "problem", None) or str(e)).strip()
        line = text.splitlines()[mark.line] if mark and mark.line < len(text.splitlines()) else ""
        fix = ("replace the tab with spaces (YAML indents with spaces only)" if "\t" in line or "'\\t'" in problem
               else "correct the YAML syntax there")
        raise ConfigError(f"{where}invalid YAML ({problem})", path=path, fix=fix) from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ConfigError(f"the file holds a YAML {type(config).__name__}, not keys and values", path=path,
                          fix="write one 'key: value' per line at the top level (see config/config.yaml)")
    return config


def load(path=DEFAULT_CONFIG, **overrides) -> dict:
    """Read a YAML config, apply overrides (top-level keys), validate."""
    config = read_yaml(path)
    config.update(overrides)
    return validate(config)


def input_mode(config: dict) -> str:
    """'bids', 'dicom', 'tabular' (a participants table, no images: participants_tsv with modalities: []) or
    'demo' (no input named at all). An input half configured for tabular-only (a table but image modalities,
    or modalities: [] or tensors.tables but no table) raises ConfigError: silently running the demo instead,
    as it once did, trains on the phantoms and looks like success."""
    if config.get("bids_dir"):
        return "bids"
    if config.get("dicom_dir"):
        return "dicom"
    table, modalities = config.get("participants_tsv"), config.get("modalities")
    if table and modalities == []:
        return "tabular"
    if table:
        raise ConfigError(f"config key 'participants_tsv' is set but neither bids_dir nor dicom_dir (no images), and "
                          f"modalities is [{', '.join(modalities or [])}]", path=table,
                          fix="set modalities: [] for a tabular-only run, or bids_dir / dicom_dir for the images")
    if modalities == [] or (config.get("tensors") or {}).get("tables"):
        key = "'modalities' is []" if modalities == [] else "'tensors.tables' is set"
        raise ConfigError(f"config key {key} (tabular-only) but participants_tsv is not set: no input is named",
                          fix="set participants_tsv to your table (participant_id, the label and feature columns), "
                              "or bids_dir / dicom_dir for images (the demo runs only when none of these is set)")
    return "demo"
