"""What a training run leaves for people: ``report.md``, ``curves.png`` and ``README.md``.

``report.md`` and ``curves.png`` are read back from ``metrics.jsonl``: per stage, the named
losses (loss, sup, unsup, kd), the mask rate, and the held-out agreement with the FM
(stage 1) and test accuracy when they were measured, and the stage-2 collapse guard's
evaluations with any rollback (``training.guard``). matplotlib runs on the Agg backend
(no display needed); it is imported here only.

``README.md`` is the model card, in the Hugging Face layout (YAML front matter, then
prose): what the model is for, its license (the student preset's, for the preset's own
weights; never assumed), the FM teacher and its measured quality, the training data's
fingerprint, the budgets, the results and the limits. ``zmdevice export`` writes it next to
the ONNX file as ``NAME.README.md``, with what the user states (``--card-*``) applied.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from zmdevice.errors import atomic_path, write_text_atomic

LOSS_KEYS = ("loss", "sup", "unsup", "kd")
RATE_KEYS = ("mask_rate", "pl_accuracy", "kd_agreement")
EVAL_KEYS = ("heldout_agreement", "heldout_gold_accuracy", "test_accuracy")
GUARD_KEYS = ("guard_heldout_agreement", "guard_labeled_accuracy")


def read_metrics(path: Path) -> list[dict]:
    """All records of a ``metrics.jsonl`` file (empty list when it does not exist)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def write_report(out: Path, summary: dict) -> None:
    """Write ``out/report.md``, ``out/curves.png`` and the model card ``out/README.md``."""
    records = read_metrics(out / "metrics.jsonl")
    plot_curves(records, out / "curves.png")
    write_text_atomic(out / "report.md", render_markdown(summary, records))
    write_text_atomic(out / "README.md", render_model_card(out, summary))


def render_markdown(summary: dict, records: list[dict]) -> str:
    """The report page: settings, per-stage numbers, final test results."""
    lines = [
        f"# {summary['student']} trained with {summary['method']}",
        "",
        f"- device: {summary['device']}, precision {summary.get('precision', 'fp32')}"
        f" ({summary.get('precision_reason', 'not recorded')}); {summary['seconds']} s in all",
        f"- {summary['labeled']} labeled, {summary['unlabeled']} unlabeled samples, "
        f"{len(summary['classes'])} classes",
        "",
        "| stage | steps | seconds | last loss | last mask rate | last eval |",
        "|---|---|---|---|---|---|",
    ]
    for index, stage in enumerate(summary["stages"]):
        mine = [r for r in records if r["stage_index"] == index]
        losses = [r for r in mine if "loss" in r]
        evals = [r for r in mine if any(k in r for k in EVAL_KEYS)]
        last_loss = f"{losses[-1]['loss']:.4f}" if losses else "-"
        masks = [r["mask_rate"] for r in mine if "mask_rate" in r]
        last_mask = f"{masks[-1]:.2f}" if masks else "-"
        last_eval = "-"
        if evals:
            last_eval = ", ".join(
                f"{k} {100 * evals[-1][k]:.1f}%" for k in EVAL_KEYS if k in evals[-1]
            )
        lines.append(
            f"| {stage['stage']} | {stage['steps']} | {stage['seconds']} | {last_loss} "
            f"| {last_mask} | {last_eval} |"
        )
    lines.append("")
    if "heldout_agreement" in summary:
        lines.append(
            f"Stage-1 model selection: held-out agreement with the FM "
            f"{100 * summary['heldout_agreement']:.1f}% at step {summary['best_kd_step']}."
        )
    if summary.get("bn_recalibrated_on"):
        lines.append(
            f"BatchNorm statistics re-estimated on {summary['bn_recalibrated_on']} clean "
            "unlabeled images before saving."
        )
    if "test_accuracy" in summary:
        lines += [
            "",
            f"## Test: accuracy {100 * summary['test_accuracy']:.1f}%, "
            f"macro-F1 {100 * summary['test_macro_f1']:.1f}%",
            "",
            "| class | recall | precision | support |",
            "|---|---|---|---|",
        ]
        for name, row in _per_class(summary.get("test_report", {})):
            lines.append(
                f"| {name} | {100 * row.get('recall', 0):.1f}% "
                f"| {100 * row.get('precision', 0):.1f}% | {row.get('support', '')} |"
            )
    lines += guard_section(summary, records)
    lines += ["", "![curves](curves.png)", ""]
    return "\n".join(lines)


def guard_section(summary: dict, records: list[dict]) -> list[str]:
    """The collapse guard's stage-2 evaluations and its verdict, as markdown lines (none
    when the guard did not observe)."""
    observed = [r for r in records if "guard_class_entropy" in r]
    if not observed:
        return []
    fired = summary.get("collapse")
    if fired is None:
        verdict = "no collapse: stage 2 kept every step."
    else:
        back = fired.get("rolled_back_to")
        done = "kept the weights as they were" if back is None else (
            f"**rolled back to the weights of stage-2 step {back}**"
        )  # fmt: skip
        verdict = f"**collapse at stage-2 step {fired['step']}**: {fired['reason']}; {done}."
    suspected = {r["step"] for r in records if "collapse_suspected" in r}
    lines = [
        "",
        "## Stage-2 collapse guard",
        "",
        f"Verdict: {verdict}",
        "",
        "| stage-2 step | agreement with the pseudo-labels | floor | class entropy "
        "| smallest class kept | labeled accuracy | |",
        "|---|---|---|---|---|---|---|",
    ]
    start = observed[0].get("guard_class_counts")
    for record in observed:
        floor = record.get("guard_agreement_floor")
        note = ""
        if record["step"] in suspected:
            note = "suspected"
        if fired is not None and record["step"] == fired["step"]:
            note = "collapse"
        if fired is not None and record["step"] == fired.get("rolled_back_to"):
            note = "rolled back to"
        lines.append(
            f"| {record['step']} | {percent(record.get('guard_heldout_agreement'))} "
            f"| {percent(floor)} | {record['guard_class_entropy']:.3f} "
            f"| {percent(smallest_kept(start, record.get('guard_class_counts')))} "
            f"| {percent(record.get('guard_labeled_accuracy'))} | {note} |"
        )
    return lines


def percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def smallest_kept(start, counts) -> float | None:
    """The smallest share of its stage-2-start predictions that a class keeps."""
    if not start or not counts:
        return None
    shares = [now / before for before, now in zip(start, counts, strict=True) if before > 0]
    return min(shares, default=None)


def _per_class(report: dict):
    per_class = report.get("per_class", {})
    if isinstance(per_class, dict):
        return list(per_class.items())
    return [(row.get("class", str(i)), row) for i, row in enumerate(per_class)]


def plot_curves(records: list[dict], path: Path) -> None:
    """Three panels over the global step: losses, rates, evaluations; stage borders dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 4, figsize=(20, 4))
    panels = (
        (axes[0], LOSS_KEYS, "losses"),
        (axes[1], RATE_KEYS, "rates"),
        (axes[2], EVAL_KEYS, "evaluation"),
        (axes[3], GUARD_KEYS, "stage-2 collapse guard"),
    )
    for axis, keys, title in panels:
        for key in keys:
            points = [(r["global_step"], r[key]) for r in records if key in r]
            if points:
                steps, values = zip(*points, strict=True)
                axis.plot(steps, values, label=key, marker="." if len(points) < 30 else None)
        axis.set_title(title)
        axis.set_xlabel("step")
        if axis.lines:
            axis.legend(fontsize=8)
    borders = sorted({r["global_step"] - r["step"] for r in records if r.get("stage_index", 0) > 0})
    for axis in axes:
        for border in borders:
            axis.axvline(border, color="grey", linestyle="--", linewidth=0.8)
    plot_guard_marks(axes[3], records)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=90)
    plt.close(figure)


def plot_guard_marks(axis, records: list[dict]) -> None:
    """The agreement floor, the smallest share a class kept, and a collapse: a red line at
    the step it acted, a red dot on the weights it rolled back to."""
    observed = [r for r in records if "guard_class_entropy" in r]
    if not observed:
        return
    start = observed[0].get("guard_class_counts")
    kept = [(r["global_step"], smallest_kept(start, r.get("guard_class_counts"))) for r in observed]
    kept = [(step, share) for step, share in kept if share is not None]
    if kept:
        axis.plot(*zip(*kept, strict=True), label="smallest class kept", marker=".")
    floor = observed[0].get("guard_agreement_floor")
    if floor is not None:
        axis.axhline(floor, color="tab:blue", linestyle=":", label="agreement floor")
    offset = observed[0]["global_step"] - observed[0]["step"]
    for record in records:
        if "collapse" not in record:
            continue
        axis.axvline(record["global_step"], color="red", linewidth=1.5, label="collapse")
        back = [r for r in observed if r["step"] == record.get("rolled_back_to")]
        for target in back:
            axis.plot([target["global_step"]], [target.get("guard_heldout_agreement") or 0],
                      "o", color="red", label="rolled back to")  # fmt: skip
    axis.set_xlim(left=min(offset, axis.get_xlim()[0]))
    axis.legend(fontsize=8)


# --------------------------------------------------------------------------- model card


def _yaml(value) -> str:
    """A YAML scalar or flow list: JSON's quoting is valid YAML."""
    return json.dumps(value, ensure_ascii=False)


def _label_file_metadata(train_config: dict) -> dict | None:
    """The metadata of the run's pseudo-label file, when it still exists and reads."""
    from zmdevice.errors import UserError
    from zmdevice.pseudolabels import read_pseudolabel_metadata

    path = train_config.get("pseudo_labels")
    if not path or not Path(path).is_file():
        return None
    try:
        return read_pseudolabel_metadata(path)
    except UserError:
        return None


def _base_model(student_config: dict) -> str | None:
    """The Hugging Face id the student's weights started from, when there is one."""
    from zmdevice.catalog import find_entry

    entry = find_entry(str(student_config.get("student", "")), "student") or {}
    weights = str(student_config.get("weights", ""))
    if entry.get("base_model") and weights == entry.get("weights"):
        return entry["base_model"]  # the preset's own weights, named in the catalog
    # distilbert:<hub id> (a local folder or file is no hub id; "random" is none)
    looks_like_hub_id = weights.count("/") == 1 and not Path(weights).exists()
    return weights if looks_like_hub_id and ":" not in weights else None


def _run_files(out: Path) -> tuple[dict, dict, dict | None]:
    """A student folder's ``config.json``, ``train_config.toml`` and label file metadata."""
    student_config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    train_path = out / "train_config.toml"
    train_config = (
        tomllib.loads(train_path.read_text(encoding="utf-8")) if train_path.is_file() else {}
    )
    return student_config, train_config, _label_file_metadata(train_config)


CARD_GIVEN = ("license", "language", "datasets", "intended_use")
"""What the user may state about a model (``zmdevice export --card-*``, a ``[card]`` table)."""


def model_card_facts(out: Path, given: dict | None = None) -> dict:
    """What a card states about a student's terms and use, and where each fact came from.

    The student preset's ``license`` (with ``license_name``/``license_link``/``license_note``)
    holds only while the run kept the preset's own weights: other weights carry their own
    terms, unknown here. The language is the preset's (same rule), else the teacher's
    catalog entry's. ``given`` (``CARD_GIVEN`` keys, None = not given) overrides each.

    Returns:
        ``license``, ``license_name``, ``license_link``, ``license_note`` (str or None),
        ``language`` and ``datasets`` (lists), ``intended_use`` (str or None), ``weights``
        (what the student started from), ``teacher`` and ``teacher_licence`` (str or None).
    """
    from zmdevice.catalog import find_entry

    student_config, _, labels = _run_files(out)
    preset = find_entry(str(student_config.get("student", "")), "student") or {}
    weights = str(student_config.get("weights", "random"))
    own_weights = bool(preset) and weights == (preset.get("weights") or "random")
    teacher_name = ((labels or {}).get("teacher") or {}).get("name")
    teacher = find_entry(str(teacher_name), "teacher") if teacher_name else None
    license_keys = ("license", "license_name", "license_link", "license_note")
    facts = {key: preset.get(key) if own_weights else None for key in license_keys}
    language = (preset.get("language") if own_weights else None) or (teacher or {}).get("language")
    facts.update(
        language=[language] if isinstance(language, str) else list(language or []),
        datasets=[],
        intended_use=None,
        weights=weights,
        teacher=teacher_name,
        teacher_licence=(teacher or {}).get("licence"),
    )
    given = {key: value for key, value in (given or {}).items() if value is not None}
    if "license" in given and given["license"] != facts["license"]:
        # The user's license replaces the preset's, its name, link and note with it.
        facts.update(license_name=None, license_link=None, license_note=None)
    facts.update({key: given[key] for key in CARD_GIVEN if key in given})
    return facts


def _card_front_lines(facts: dict) -> list[str]:
    """The front matter lines of ``model_card_facts`` (first in the card, in this order)."""
    lines = [
        f"{key}: {_yaml(facts[key])}"
        for key in ("license", "license_name", "license_link")
        if facts.get(key)
    ]
    lines += [f"{key}: {_yaml(facts[key])}" for key in ("language", "datasets") if facts.get(key)]
    return lines


CARD_FRONT_KEYS = ("license", "license_name", "license_link", "language", "datasets")


def _intended_use_lines(modality: str, facts: dict) -> list[str]:
    use = facts.get("intended_use") or (
        f"Classifying {modality}s like the training data into exactly these classes, on "
        "device: export it with `zmdevice export` and run the ONNX file with onnxruntime "
        "(no torch)."
    )
    return [
        use.strip(),
        "",
        "It always answers one of the classes above; it has no 'none of these' answer.",
    ]


def _license_lines(facts: dict) -> list[str]:
    if facts.get("license"):
        named = f" ({facts['license_name']})" if facts.get("license_name") else ""
        link = f", see {facts['license_link']}" if facts.get("license_link") else ""
        lines = [f"License: `{facts['license']}`{named}{link}."]
        if facts.get("license_note"):
            lines.append(facts["license_note"])
    else:
        lines = [
            f"License: not known here. The student started from the weights "
            f"`{facts.get('weights', '?')}`, which carry their own terms; state the license "
            "with `zmdevice export --card-license ID` once you know it."
        ]
    if facts.get("teacher"):
        licence = facts.get("teacher_licence") or "not in the catalog; check its terms"
        lines.append(f"The pseudo-labels came from the teacher `{facts['teacher']}` ({licence}).")
    return lines


def update_model_card(text: str, facts: dict, modality: str) -> str:
    """``text`` (a card ``render_model_card`` wrote) with the front matter keys, the intended
    use and the license of ``facts``; the rest is kept. Applied to a card rendered from the
    same facts, it changes nothing."""
    if text.startswith("---\n") and "\n---\n" in text[4:]:
        end = text.index("\n---\n", 4)
        kept = [
            line for line in text[4:end].split("\n") if line.split(":", 1)[0] not in CARD_FRONT_KEYS
        ]
        text = "\n".join(["---", *_card_front_lines(facts), *kept]) + text[end:]
    text = _replace_section(text, "Intended use", _intended_use_lines(modality, facts))
    return _replace_section(text, "License", _license_lines(facts))


def _replace_section(text: str, heading: str, lines: list[str]) -> str:
    """The ``## heading`` section's body replaced by ``lines`` (appended when absent)."""
    body = "\n".join(["", *lines, ""])
    marker = f"\n## {heading}\n"
    start = text.find(marker)
    if start < 0:
        return text.rstrip("\n") + f"\n{marker}{body}"
    begin = start + len(marker)
    end = text.find("\n## ", begin)
    return text[:begin] + body + (text[end:] if end >= 0 else "\n")


def exported_model_card(model_dir: Path, given: dict | None = None) -> str:
    """The card ``zmdevice export`` writes: the training folder's ``README.md`` (or, when it
    is gone, one rendered from the folder's files) with the facts of ``given`` applied."""
    card = model_dir / "README.md"
    text = card.read_text(encoding="utf-8") if card.is_file() else render_model_card(model_dir, {})
    modality = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get(
        "modality", "image"
    )
    return update_model_card(text, model_card_facts(model_dir, given), modality)


def render_model_card(out: Path, summary: dict, given: dict | None = None) -> str:
    """The model card of a trained student folder (``README.md``), from its files.

    Reads ``config.json`` (student, classes, preprocessing, weights), ``train_config.toml``
    (data, budgets), the pseudo-label file's metadata (teacher, data fingerprint and, when
    the file was made with ``--gold``, the teacher's measured quality) and the catalog
    entries of the student preset and the teacher (license, language: ``model_card_facts``,
    where ``given`` overrides them).
    """
    student_config, train_config, labels = _run_files(out)
    facts = model_card_facts(out, given)
    hyper = {**train_config, **train_config.get("extra", {})}  # flat, or an [extra] table
    modality = student_config.get("modality", "image")
    task = f"{modality}-classification"
    classes = list(student_config.get("classes", summary.get("classes", [])))
    base_model = _base_model(student_config)
    method = summary.get("method", train_config.get("method", "zeromatch"))
    name = out.name

    front = ["---", *_card_front_lines(facts), 'library_name: "zmdevice"']
    front.append(f"pipeline_tag: {_yaml(task)}")
    tags = ["zmdevice", method, "knowledge-distillation", "semi-supervised", task, "onnx"]
    front.append(f"tags: {_yaml(tags)}")
    front.append(f"metrics: {_yaml(['accuracy', 'f1'])}")
    if base_model:
        front.append(f"base_model: {_yaml(base_model)}")
    if "test_accuracy" in summary:
        test_name = Path(str(train_config.get("test", "test"))).name
        front += [
            "model-index:",
            f"- name: {_yaml(name)}",
            "  results:",
            f"  - task: {{type: {_yaml(task)}}}",
            f"    dataset: {{name: {_yaml(test_name)}, type: {_yaml('custom')}}}",
            "    metrics:",
            f"    - {{type: accuracy, value: {summary['test_accuracy']:.4f}}}",
            f"    - {{type: f1, name: macro-F1, value: {summary['test_macro_f1']:.4f}}}",
        ]
    front.append("---")

    student_name = summary.get("student", student_config.get("student", "?"))
    lines = [
        *front,
        "",
        f"# {name}",
        "",
        f"A {student_name} {modality} classifier over {len(classes)} classes "
        f"({', '.join(classes)}), trained by zmdevice with `--method {method}` "
        "from a foundation model's zero-shot pseudo-labels and a few true labels.",
        "",
        "## Intended use",
        "",
        *_intended_use_lines(modality, facts),
        "",
        "## License",
        "",
        *_license_lines(facts),
        "",
        "## Foundation-model teacher",
        "",
    ]
    if labels is None:
        lines.append(
            "No pseudo-label file was used (or it is no longer at the path the run "
            "recorded), so the teacher is not known here."
            if method not in ("zeromatch", "kd", "naive-pl")
            else f"Pseudo-labels from {train_config.get('pseudo_labels')} (the file is no "
            "longer there: teacher details unavailable)."
        )
    else:
        teacher = labels.get("teacher", {})
        lines.append(
            f"Teacher `{teacher.get('spec', '?')}`, run zero-shot once by `zmdevice label` "
            f"over {labels.get('data', {}).get('count', '?')} samples "
            f"(pseudo-label file `{Path(str(train_config.get('pseudo_labels'))).name}`, "
            f"created {labels.get('created', '?')})."
        )
        quality = labels.get("quality")
        if quality:
            lines += [
                "",
                f"Measured against {quality.get('count', '?')} true labels "
                f"(`--gold {Path(str(quality.get('gold', '?'))).name}`): accuracy "
                f"{100 * quality['accuracy']:.1f}%, macro-F1 "
                f"{100 * quality.get('macro_f1', 0):.1f}%.",
            ]
            per_class = quality.get("per_class", {})
            if isinstance(per_class, dict) and per_class:
                recalls = ", ".join(
                    f"{cls} {100 * row.get('recall', 0):.0f}%" for cls, row in per_class.items()
                )
                lines.append(f"Teacher recall per class: {recalls}.")
        else:
            lines += ["", "The teacher's accuracy was not measured (label without `--gold`)."]

    lines += ["", "## Training data", ""]
    fingerprint = (labels or {}).get("data", {}).get("fingerprint")
    lines.append(
        f"{summary.get('labeled', '?')} labeled samples (`{train_config.get('labeled', '?')}`) "
        f"and {summary.get('unlabeled', '?')} unlabeled samples "
        f"(`{train_config.get('unlabeled', '?')}`)."
    )
    if fingerprint:
        lines.append(
            f"Unlabeled data fingerprint (SHA-256 of ids and content, as `zmdevice` computes "
            f"it): `{fingerprint}`."
        )

    lines += ["", "## Training", ""]
    stages = summary.get("stages", [])
    stage_text = "; ".join(
        f"{stage['stage']} {stage['steps']} steps ({stage['seconds']} s)" for stage in stages
    )
    lines.append(
        f"Method `{method}`, seed {train_config.get('seed', '?')}, on {summary.get('device', '?')} "
        f"in {summary.get('seconds', '?')} s: {stage_text or 'no stages'}."
    )
    budget = {
        key: hyper[key]
        for key in ("kd_batch_size", "labeled_batch_size", "unlabeled_batch_size", "lr", "head_lr")
        if key in hyper
    }
    if budget:
        lines.append(
            "Batch sizes and learning rates: "
            + ", ".join(f"{key} {value}" for key, value in budget.items())
            + "; every setting is in `train_config.toml` (rerun with `--config`)."
        )
    preprocess = student_config.get("preprocess", {})
    if modality == "image":
        lines.append(f"Inputs: RGB resized to {preprocess.get('image_size', '?')} px.")
    else:
        lines.append(f"Inputs: at most {preprocess.get('max_length', '?')} tokens.")

    lines += ["", "## Results", ""]
    if "heldout_agreement" in summary:
        lines.append(
            f"- Stage 1 agreement with the teacher on held-out training samples: "
            f"{100 * summary['heldout_agreement']:.1f}% (step {summary.get('best_kd_step')})."
        )
    if "test_accuracy" in summary:
        lines.append(
            f"- Test (`{train_config.get('test')}`): accuracy "
            f"{100 * summary['test_accuracy']:.1f}%, macro-F1 "
            f"{100 * summary['test_macro_f1']:.1f}%."
        )
        if labels and labels.get("quality"):
            lines.append(
                f"- The teacher scored {100 * labels['quality']['accuracy']:.1f}% on its gold "
                "labels (other samples than the test set unless they are the same file)."
            )
    else:
        lines.append("- No test data was given (`--test`): accuracy not measured.")
    lines.append(
        "- Curves and per-stage numbers: `report.md` and `curves.png` in the training folder."
    )

    lines += [
        "",
        "## Limits",
        "",
        "- Trained on few true labels: its accuracy is bounded by the teacher's knowledge and "
        "by how well the labeled samples cover each class; measure it on your own data "
        "(`zmdevice evaluate`).",
        "- The teacher's errors and biases (skewed class choices, prompt wording) carry over.",
        "- Inputs unlike the training data (another domain, language or image style) get "
        "confident answers that may be wrong.",
        "",
    ]
    return "\n".join(lines)
