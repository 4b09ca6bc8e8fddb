"""Class lists: the names of the target classes in order, with the prompts or descriptions
the user gave for each, read from a comma list, a one-per-line file, or a TOML/JSON
mapping. Index i is class i everywhere: pseudo-labels, student heads, ONNX outputs."""

from __future__ import annotations

import json
import math
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from zmdevice.errors import UserError


@dataclass
class ClassList:
    """Class names in order, with the prompts or descriptions the user gave for each.

    ``prompts[name]`` is an empty list when the spec gave none (comma list, one-per-line
    file): teachers then build prompts from the name and their templates.
    """

    names: list[str]
    """Class names; index i is class i everywhere (pseudo-labels, student head, ONNX)."""
    prompts: dict[str, list[str]]
    """Class name -> user prompts/descriptions (possibly empty)."""

    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        """The class index of ``name`` (ValueError if unknown)."""
        return self.names.index(name)

    @property
    def has_prompts(self) -> bool:
        """True when at least one class came with its own prompts or descriptions."""
        return any(self.prompts.values())


def load_classes(spec: str) -> ClassList:
    """Read a class list from a comma list, a text file, or a TOML/JSON file.

    Args:
        spec: ``"cat,dog"``; a ``.txt`` (or any other) file with one class per line
            (blank lines and ``#`` comments ignored); or a ``.toml``/``.json`` file mapping
            each class to a prompt string or a list of prompts (JSON may also be a list of
            names; TOML may nest the mapping under ``[classes]``).

    Raises:
        UserError: missing file, malformed file, duplicate class, fewer than two classes.
    """
    spec = str(spec).strip()
    path = Path(spec)
    looks_like_file = path.suffix.lower() in (".toml", ".json", ".txt") or os.sep in spec
    if path.is_file():
        mapping = _read_class_file(path)
        where = str(path)
    elif looks_like_file and "," not in spec:
        raise UserError(f"class file not found: {spec}; give a file or a comma list like 'a,b'")
    else:
        where = "--classes"
        names = spec.split(",")
        _check_names(names, where)
        mapping = {name.strip(): [] for name in names}
    names = list(mapping)
    _check_names(names, where)
    return ClassList(names=names, prompts=mapping)


def _check_names(names: list[str], where: str) -> None:
    """Class names as written: none empty, none repeated once surrounding spaces go."""
    if any(not name.strip() for name in names):
        raise UserError(f"empty class name in {where}")
    seen: dict[str, str] = {}
    for name in names:
        key = name.strip()
        if key in seen:
            spelled = "" if seen[key] == name else f" (as {seen[key]!r} and {name!r})"
            raise UserError(
                f"class '{key}' is listed twice in {where}{spelled}; class names are compared "
                "without surrounding spaces, so give each class once"
            )
        seen[key] = name
    if len(names) < 2:
        raise UserError(f"{where} gives {len(names)} class(es); a classifier needs at least 2")


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise UserError(
            f"{what} {path} is not UTF-8 text ({error.reason} at byte {error.start}); "
            "save it as UTF-8"
        ) from None


def _parse_toml_or_json(path: Path, text: str, what: str):
    """The content of a .toml file, else of a JSON one."""
    if path.suffix.lower() == ".toml":
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise UserError(f"{what} {path} is not valid TOML: {error}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"{what} {path} is not valid JSON: {error}") from None


def _read_class_file(path: Path) -> dict[str, list[str]]:
    text = _read_text(path, "class file")
    if path.suffix.lower() in (".toml", ".json"):
        data = _parse_toml_or_json(path, text, "class file")
        if path.suffix.lower() == ".toml" and set(data) == {"classes"}:
            data = data["classes"]
    else:
        names = []
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                names.append(line)
        _check_names(names, str(path))
        return {name: [] for name in names}
    if isinstance(data, list) and all(isinstance(name, str) for name in data):
        _check_names(data, str(path))
        return {name.strip(): [] for name in data}
    if not isinstance(data, dict):
        raise UserError(f"class file {path} must map each class name to its prompt(s)")
    _check_names(list(data), str(path))
    mapping: dict[str, list[str]] = {}
    for name, value in data.items():
        if isinstance(value, str):
            prompts = [value]
        elif isinstance(value, list) and all(isinstance(item, str) for item in value):
            prompts = list(value)
        else:
            raise UserError(
                f"class '{name}' in {path} must map to a string or a list of strings, "
                f"got {type(value).__name__}"
            )
        mapping[name.strip()] = [prompt for prompt in prompts if prompt.strip()]
    return mapping


def load_class_prior(spec: str, classes: ClassList) -> list[float]:
    """The class shares a user expects in the data: ``"balanced"``, a comma list
    ``"cat=3,dog=1"``, or a ``.json``/``.toml`` file mapping every class to a share.

    Shares are relative (normalised here) and positive: a class that never occurs belongs out
    of the class list, not in the prior.

    Returns:
        One share per class of ``classes``, in their order, summing to 1.

    Raises:
        UserError: missing or malformed file, unknown or missing class, a share that is not a
            positive number.
    """
    spec = str(spec).strip()
    if spec == "balanced":
        return [1.0 / len(classes)] * len(classes)
    path = Path(spec)
    if path.suffix.lower() in (".json", ".toml") or os.sep in spec:
        where, shares = str(path), _read_prior_file(path)
    else:
        where, shares = "--class-prior", {}
        for item in spec.split(","):
            name, equals, value = item.partition("=")
            if not equals:
                raise UserError(
                    f"--class-prior item '{item}' is not NAME=SHARE: give 'balanced', "
                    "'cat=3,dog=1' or a .json file mapping each class to its share"
                )
            if name.strip() in shares:
                raise UserError(f"--class-prior gives class '{name.strip()}' twice: give it once")
            shares[name.strip()] = value.strip()
    unknown = [name for name in shares if name not in classes.names]
    if unknown:
        raise UserError(
            f"{where} names unknown class(es) {', '.join(map(repr, unknown[:5]))}: use the "
            "names of --classes"
        )
    missing = [name for name in classes.names if name not in shares]
    if missing:
        raise UserError(
            f"{where} gives no share for class(es) {', '.join(map(repr, missing[:5]))}"
            f"{' ...' if len(missing) > 5 else ''}: give every class a share"
        )
    values = [_positive_share(shares[name], name, where) for name in classes.names]
    # Scaled by the largest share first: a sum of huge shares (1e308 each) would overflow to
    # inf and turn every share into 0, and the label file into NaN.
    largest = max(values)
    scaled = [value / largest for value in values]
    total = sum(scaled)
    normalised = [value / total for value in scaled]
    vanished = [name for name, share in zip(classes.names, normalised, strict=True) if share <= 0]
    if vanished:
        raise UserError(
            f"{where}: the share of class '{vanished[0]}' is too small next to the largest "
            f"({largest:g}) to be represented; give shares closer together"
        )
    return normalised


def check_few_shot_classes(labels: list[str], classes: ClassList, where: str) -> list[str]:
    """A labeled set that adapts a teacher (few-shot) must show it at least two classes:
    fitted on one, the teacher labels everything that class.

    Args:
        labels: the labeled set's label of each example.
        classes: the target classes.
        where: the flag and file, for the message ("--few-shot data.csv").

    Returns:
        The classes with no example (the caller may say so), in class order.

    Raises:
        UserError: fewer than two of ``classes`` have an example.
    """
    present = set(labels)
    found = [name for name in classes.names if name in present]
    if len(found) < 2:
        held = f"only class '{found[0]}'" if found else "none of the classes"
        raise UserError(
            f"{where} holds examples of {held} ({len(labels)} example(s)); a few-shot set "
            f"needs examples of at least 2 classes of {len(classes)}, better of every class"
        )
    return [name for name in classes.names if name not in present]


def _read_prior_file(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"class prior file not found: {path}; give 'balanced' or an existing file")
    data = _parse_toml_or_json(path, _read_text(path, "class prior file"), "class prior file")
    if not isinstance(data, dict):
        raise UserError(f"class prior file {path} must map each class name to its share")
    return {str(name).strip(): value for name, value in data.items()}


def _positive_share(value, name: str, where: str) -> float:
    try:
        share = float("nan") if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        share = float("nan")
    if not (math.isfinite(share) and share > 0):
        raise UserError(
            f"{where}: the share of class '{name}' is {value!r}; give a positive number "
            "(a class that never occurs belongs out of --classes)"
        )
    return share
