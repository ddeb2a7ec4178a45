"""Question/answer JSONL files, the shape LLaVA/InternVL fine-tuning data takes:

    {"image": "path/to.jpg", "question": "...", "answer": "...", "type": "colour", "meta": {...}}

`image` is relative to the JSONL's folder (or absolute). `type` (the question type, for per-type
accuracy) and `meta` (labels the synthetic task adds: colour, shape, position, box) are optional.
Bad lines are skipped and counted by reason, or refused with their line number (`strict`).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from sleigh.errors import SleighError

EXPECTED_LINE = 'one JSON object per line: {"image": path, "question": str, "answer": str}'


@dataclass(frozen=True)
class QA:
    line: int  # 1-based line number in the JSONL
    image: Path
    question: str
    answer: str
    type: str = "all"
    meta: dict = field(default_factory=dict, hash=False, compare=False)


@dataclass
class QAData:
    path: Path
    items: list[QA]
    skipped: Counter  # reason -> count
    first_skipped: dict  # reason -> first line number

    def by_image(self) -> list[tuple[Path, list[QA]]]:
        """The items grouped by image, in order of first appearance (one vision pass per image)."""
        groups: dict[Path, list[QA]] = defaultdict(list)
        for qa in self.items:
            groups[qa.image].append(qa)
        return list(groups.items())

    def skipped_text(self) -> str:
        return ", ".join(f"{n} {reason} (first on line {self.first_skipped[reason]})"
                         for reason, n in sorted(self.skipped.items()))


def resolve_jsonl(data: Path) -> Path:
    """A .jsonl file, or a folder holding exactly one."""
    data = Path(data)
    if data.is_file():
        return data
    if data.is_dir():
        found = sorted(data.glob("*.jsonl"))
        if len(found) == 1:
            return found[0]
        problem = "holds no .jsonl file" if not found else f"holds {len(found)} .jsonl files ({', '.join(p.name for p in found)})"
        raise SleighError(str(data), problem, "a .jsonl file, or a folder with exactly one (sleigh data synth writes SPLIT.jsonl)")
    raise SleighError(str(data), "not found", "a .jsonl file of image/question/answer lines")


def read_qa(data: Path, *, strict: bool = False, check_images: bool = True) -> QAData:
    """Parse and check every line. Skipped reasons: bad JSON, missing field, empty answer, missing
    image, unreadable image (its header; a file that breaks later is skipped where it is read)."""
    path = resolve_jsonl(data)
    root = path.parent
    items: list[QA] = []
    skipped: Counter = Counter()
    first: dict[str, int] = {}
    image_ok: dict[Path, str | None] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SleighError(str(path), f"cannot be read ({e})", "a UTF-8 JSONL file") from None
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        qa, reason = _parse(raw, number, root)
        if qa is not None and check_images:
            if qa.image not in image_ok:
                image_ok[qa.image] = _image_problem(qa.image)
            reason = image_ok[qa.image]
        if reason is None:
            items.append(qa)
            continue
        if strict:
            raise SleighError(f"{path}:{number}", reason, EXPECTED_LINE + " with an existing, readable image")
        skipped[reason.split(" (")[0]] += 1
        first.setdefault(reason.split(" (")[0], number)
    if not items:
        detail = f" ({', '.join(f'{n} {r}' for r, n in sorted(skipped.items()))})" if skipped else ""
        raise SleighError(str(path), f"has no usable lines{detail}", EXPECTED_LINE)
    return QAData(path, items, skipped, first)


def _parse(raw: str, number: int, root: Path) -> tuple[QA | None, str | None]:
    try:
        d = json.loads(raw)
    except json.JSONDecodeError as e:
        return None, f"bad JSON ({e.msg})"
    if not isinstance(d, dict):
        return None, "bad JSON (not an object)"
    for key in ("image", "question", "answer"):
        if not isinstance(d.get(key), str):
            return None, f"missing field ({key!r} is not a string)"
    if not d["answer"].strip():
        return None, "empty answer"
    if not d["question"].strip():
        return None, "empty question"
    image = Path(d["image"])
    meta = d.get("meta") if isinstance(d.get("meta"), dict) else {}
    return QA(number, image if image.is_absolute() else root / image, d["question"], d["answer"].strip(),
              str(d.get("type") or "all"), meta), None


def _image_problem(path: Path) -> str | None:
    if not path.is_file():
        return f"missing image ({path})"
    try:
        with Image.open(path) as im:
            im.size  # the header parsed
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return f"unreadable image ({path}: {type(e).__name__})"
    return None
