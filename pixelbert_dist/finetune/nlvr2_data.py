"""NLVR2: the official jsonl reader, image naming, predictions file and metrics.

Each line of ``train.json`` / ``dev.json`` / ``test1.json`` is one example with an
``identifier`` ``split-set_id-pair_id-sentence_id`` (e.g. ``dev-850-0-0``), a ``sentence``
and a ``label`` ("True"/"False"). The two images are named from the identifier without
its sentence id: ``dev-850-0-img0.png`` (left) and ``dev-850-0-img1.png`` (right); the
official train images sit in numbered sub-folders given by the line's ``directory``.

The metrics follow the official ``eval/metrics.py``: accuracy, and consistency = the
share of sentences (identifier with the pair id blanked) whose every pair is right.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence


class Nlvr2FormatError(ValueError):
    """An NLVR2 file or line that cannot be read, naming the file and the line."""


@dataclass(frozen=True)
class Nlvr2Example:
    identifier: str
    sentence: str
    label: bool | None  # None on an unlabelled (hidden test) split
    left_image: str  # image key, e.g. "dev-850-0-img0"
    right_image: str
    left_path: Path | None = None  # resolved under image_dir, when one is given
    right_path: Path | None = None

    @property
    def sentence_group(self) -> str:
        """The consistency group: the identifier with its pair id blanked."""
        parts = self.identifier.split("-")
        parts[2] = ""
        return "-".join(parts)


def image_keys(identifier: str) -> tuple[str, str]:
    """``dev-850-0-0`` -> (``dev-850-0-img0``, ``dev-850-0-img1``)."""
    parts = identifier.split("-")
    if len(parts) != 4 or not all(parts) or not all(p.isdigit() for p in parts[1:]):
        raise ValueError(f"identifier {identifier!r} is not of the form split-set_id-pair_id-sentence_id")
    stem = "-".join(parts[:3])
    return f"{stem}-img0", f"{stem}-img1"


def _parse_label(value, where: str) -> bool | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise Nlvr2FormatError(f'{where}: label must be "True" or "False", got {value!r}')


def _resolve(image_dir: Path, key: str, directory, where: str) -> Path:
    candidates = [image_dir / f"{key}.png"]
    if directory is not None:  # the official train images: images/train/<directory>/
        candidates.insert(0, image_dir / str(directory) / f"{key}.png")
    for path in candidates:
        if path.is_file():
            return path
    raise Nlvr2FormatError(f"{where}: image {key}.png not found under {image_dir}")


def _parse_line(line: str, where: str, image_dir: Path | None) -> Nlvr2Example:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise Nlvr2FormatError(f"{where}: not valid JSON ({err})") from None
    if not isinstance(row, dict):
        raise Nlvr2FormatError(f"{where}: expected a JSON object")
    identifier, sentence = row.get("identifier"), row.get("sentence")
    if not isinstance(identifier, str) or not isinstance(sentence, str):
        raise Nlvr2FormatError(f"{where}: 'identifier' and 'sentence' must be strings")
    try:
        left, right = image_keys(identifier)
    except ValueError as err:
        raise Nlvr2FormatError(f"{where}: {err}") from None
    paths = (None, None)
    if image_dir is not None:
        paths = tuple(_resolve(image_dir, key, row.get("directory"), where) for key in (left, right))
    return Nlvr2Example(identifier, sentence, _parse_label(row.get("label"), where), left, right, *paths)


def read_nlvr2(jsonl_path: str | Path, image_dir: str | Path | None = None) -> list[Nlvr2Example]:
    """Examples of an official NLVR2 jsonl file, in file order; with ``image_dir`` every
    image must exist there (or in the line's ``directory`` sub-folder)."""
    path = Path(jsonl_path)
    if not path.is_file():
        raise Nlvr2FormatError(f"{path}: file not found")
    image_dir = Path(image_dir) if image_dir is not None else None
    examples, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            example = _parse_line(line, f"{path}:{lineno}", image_dir)
            if example.identifier in seen:
                raise Nlvr2FormatError(f"{path}:{lineno}: duplicate identifier {example.identifier}")
            seen.add(example.identifier)
            examples.append(example)
    return examples


def drop_missing_images(
    examples: Sequence[Nlvr2Example], available_keys: Iterable[str]
) -> tuple[list[Nlvr2Example], dict]:
    """Keep the examples whose two images are available; count the rest for the results."""
    available = set(available_keys)
    kept = [ex for ex in examples if ex.left_image in available and ex.right_image in available]
    missing = sorted({k for ex in examples for k in (ex.left_image, ex.right_image)} - available)
    return kept, {
        "examples_missing_image": len(examples) - len(kept),
        "images_missing": len(missing),
        "example_missing_images": missing[:5],
    }


def _check_predictions(predictions: Mapping[str, bool], examples: Sequence[Nlvr2Example]) -> None:
    wanted = {ex.identifier for ex in examples}
    missing = sorted(wanted - set(predictions))
    extra = sorted(set(predictions) - wanted)
    if missing or extra:
        raise ValueError(
            f"predictions do not match the examples: {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(extra)} unknown (e.g. {extra[:3]})"
        )


def evaluate_nlvr2(predictions: Mapping[str, bool], examples: Sequence[Nlvr2Example]) -> dict:
    """Accuracy and consistency in percent (official ``eval/metrics.py``)."""
    _check_predictions(predictions, examples)
    correct, groups = 0, {}
    for ex in examples:
        if ex.label is None:
            raise ValueError(f"{ex.identifier} has no label to evaluate against")
        right = bool(predictions[ex.identifier]) == ex.label
        correct += right
        groups[ex.sentence_group] = groups.get(ex.sentence_group, True) and right
    n = len(examples)
    return {
        "accuracy": 100.0 * correct / n if n else 0.0,
        "consistency": 100.0 * sum(groups.values()) / len(groups) if groups else 0.0,
        "num_examples": n,
        "num_sentences": len(groups),
    }


def write_nlvr2_predictions(
    path: str | Path, predictions: Mapping[str, bool], examples: Sequence[Nlvr2Example] | None = None
) -> Path:
    """The official predictions CSV: ``identifier,True|False`` per line."""
    if examples is not None:
        _check_predictions(predictions, examples)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{ident},{bool(p)}\n" for ident, p in predictions.items()))
    os.replace(tmp, path)
    return path


def read_nlvr2_predictions(path: str | Path) -> dict[str, bool]:
    out = {}
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        ident, _, value = line.strip().partition(",")
        label = _parse_label(value, f"{path}:{lineno}")
        if label is None or not ident:
            raise Nlvr2FormatError(f"{path}:{lineno}: expected 'identifier,True|False'")
        out[ident] = label
    return out
