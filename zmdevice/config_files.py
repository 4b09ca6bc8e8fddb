"""Configs from a ``--config`` TOML file and the typed flags: ``load_config``.

The file is read and type-checked first (unknown keys refused, naming key and file), then
every flag the user typed goes on top, so a typed flag always wins and an untyped one never
does. A config's ``data_options`` field (``DataOptions``) is set by its own fields' keys.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

from zmdevice.config_checks import ConfigError, check_type
from zmdevice.errors import UserError


def data_options_class(cls) -> type | None:
    """The ``DataOptions`` class a config nests as ``data_options``, else None."""
    nested = {f.name: f.default_factory for f in dataclasses.fields(cls)}.get("data_options")
    return nested if nested is not dataclasses.MISSING else None


def config_fields(cls) -> dict[str, dataclasses.Field]:
    """The settable keys of a config class: its fields, with ``data_options`` flattened."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    nested = data_options_class(cls)
    if nested is not None:
        del fields["data_options"]
        fields.update({f.name: f for f in dataclasses.fields(nested)})
    return fields


def parse_toml(path: Path) -> dict:
    """The TOML file's table; a UserError naming ``--config`` when it is not TOML."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"--config {path} is not valid TOML: {error}") from None


def read_config_file(cls, config_file: Path) -> dict:
    """The file's keys for ``cls``, type-checked; unknown keys are a UserError."""
    path = Path(config_file)
    if not path.is_file():
        raise UserError(f"--config {path}: file not found")
    values = parse_toml(path)
    # Files written before the hyper-parameters became fields kept them in an [extra] table.
    if isinstance(values.get("extra"), dict) and "extra" not in config_fields(cls):
        values.update(values.pop("extra"))
    # `zmdevice export`'s [card] table: license, language, dataset, intended_use.
    if isinstance(values.get("card"), dict) and "card_license" in config_fields(cls):
        for key, value in values.pop("card").items():
            many = key in ("language", "dataset")
            values[f"card_{key}"] = [value] if many and isinstance(value, str) else value
    known = config_fields(cls)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UserError(
            f"config file {path}: unknown key(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(known))}"
        )
    for key, value in values.items():
        check_type(key, value, str(known[key].type), f"config file {path}")
    return values


def load_config(cls, config_file: Path | None, flags: dict):
    """Build ``cls`` from an optional TOML file and the flags the user typed.

    Args:
        cls: LabelConfig, TrainConfig or ExportConfig.
        config_file: the ``--config`` file, or None.
        flags: field -> value of each flag the user typed; None (or the empty list a
            repeatable flag left out gives) means "not typed" and never overrides.
    """
    from_file = read_config_file(cls, config_file) if config_file is not None else {}
    typed = {key: value for key, value in flags.items() if value is not None and value != []}
    values = {**from_file, **typed}
    fields = config_fields(cls)
    missing = [
        key
        for key, item in fields.items()
        if item.default is dataclasses.MISSING
        and item.default_factory is dataclasses.MISSING
        and key not in values
    ]
    if missing:
        key = missing[0]
        raise UserError(f"--{key.replace('_', '-')} is required (a flag or `{key} =` in --config)")
    nested = data_options_class(cls)
    if nested is not None:
        names = [f.name for f in dataclasses.fields(nested)]
        values["data_options"] = nested(**{k: values.pop(k) for k in names if k in values})
    try:
        return cls(**values)
    except ConfigError as error:
        if error.key in typed:
            raise UserError(f"--{error.key.replace('_', '-')}: {error}") from None
        if error.key in from_file:
            raise UserError(f"config file {config_file}: {error}") from None
        raise
