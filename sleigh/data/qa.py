"""Question/answer JSONL files, the shape LLaVA/InternVL fine-tuning data takes:

    {"image": "path/to.jpg", "question": "...", "answer": "...", "type": "colour", "meta": {...}}

`image` is relative to the JSONL's folder (or absolute); for a JSONL that is a symlink, the folder of
the file it points to, where its images were written beside it. `type` (the question type, for per-type
accuracy; "untyped" where absent) and `meta` (labels the synthetic task adds: colour, shape, position,
box, size) are optional; a label of the wrong type is dropped, as if absent. Lines end at "\n" alone
(JSON strings may hold U+2028 and the like), a BOM is ignored. Bad lines are skipped and counted by
reason, or refused with their line number (`strict`).
"""

from __future__ import annotations

import json
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from sleigh.errors import SleighError, first_line
from sleigh.runtime.fields import KINDS
from sleigh.runtime.image import file_kind, oriented_size

EXPECTED_LINE = ('one JSON object per line: {"image": path, "question": str, "answer": str}, '
                 "image paths relative to the JSONL's folder (a symlinked JSONL's target's) or absolute")
UNTYPED = "untyped"  # a line without a question type (not "all": that is the report's total)


@dataclass(frozen=True)
class QA:
    line: int  # 1-based line number in the JSONL
    image: Path
    question: str
    answer: str
    type: str = UNTYPED
    meta: dict = field(default_factory=dict, hash=False, compare=False)


@dataclass
class QAData:
    path: Path
    items: list[QA]
    skipped: Counter  # reason -> count
    first_skipped: dict  # reason -> first line number
    sizes: dict = field(default_factory=dict)  # image checked -> (width, height) as tiled (EXIF applied), from its header
    skipped_lines: list = field(default_factory=list)  # (line number, reason) of each line skipped, in order

    def skipped_before(self, line: int) -> Counter:
        """The lines skipped before line `line`, by reason: what a reader that stops there skipped."""
        return Counter(kind for number, kind in self.skipped_lines if number < line)

    def by_image(self) -> list[tuple[Path, list[QA]]]:
        """The items grouped by image, in order of first appearance (one vision pass per image)."""
        groups: dict[Path, list[QA]] = defaultdict(list)
        for qa in self.items:
            groups[qa.image].append(qa)
        return list(groups.items())

    def first_lines(self) -> dict[str, str]:
        """Each skip reason -> `line N`, the first line it struck."""
        return {why: f"line {n}" for why, n in self.first_skipped.items()}

    def skipped_text(self) -> str:
        return skipped_text(self.skipped, self.first_lines())


def skipped_text(skipped: dict, first: dict | None = None) -> str:
    """`2 image not loaded (first on line 4: image 'a.jpg' is corrupt ...), 1 bad JSON`: the count of
    lines skipped for each reason, with where (and why) it first struck where `first` says."""
    first = first or {}
    return ", ".join(f"{n} {why} (first on {first[why]})" if why in first else f"{n} {why}" for why, n in sorted(skipped.items()))


def resolve_jsonl(data: Path) -> Path:
    """A .jsonl file, or a folder holding exactly one."""
    data = Path(data)
    if data.is_file():
        return data
    if data.is_dir():
        found = sorted(p for p in data.glob("*.jsonl") if p.is_file())
        if len(found) == 1:
            return found[0]
        problem = "holds no .jsonl file" if not found else f"holds {len(found)} .jsonl files ({', '.join(p.name for p in found)})"
        raise SleighError(str(data), problem, "a .jsonl file, or a folder with exactly one (sleigh data synth writes SPLIT.jsonl)")
    if data.exists():  # /dev/null, a FIFO: there, but nothing to read lines from (a FIFO would block)
        raise SleighError(str(data), f"is not a regular file or a folder (a {file_kind(data.stat().st_mode)})",
                          "a .jsonl file of image/question/answer lines")
    raise SleighError(str(data), "not found", "a .jsonl file of image/question/answer lines")


def images_root(jsonl: Path) -> Path:
    """The folder a JSONL's relative image paths start from: its own, or, for a symlink, its target's
    (a link to a dataset's JSONL reads that dataset's images, not files beside the link)."""
    return jsonl.resolve().parent if jsonl.is_symlink() else jsonl.parent


def read_qa(data: Path, *, strict: bool = False, check_images: bool = True) -> QAData:
    """Parse and check every line. Skipped reasons: not UTF-8, bad JSON, missing field, wrong type,
    empty answer or question, empty image path, missing image, image not a file, image too large to open
    (past Pillow's limit), unreadable image (its header; a file that breaks later is skipped where it is
    read)."""
    path = resolve_jsonl(data)
    root = images_root(path)
    items: list[QA] = []
    skipped: Counter = Counter()
    first: dict[str, int] = {}
    image_ok: dict[Path, str | None] = {}
    sizes: dict[Path, tuple[int, int]] = {}
    detail: dict[str, str] = {}
    skipped_lines: list[tuple[int, str]] = []
    try:
        data_bytes = path.read_bytes()
    except OSError as e:
        raise SleighError(str(path), f"cannot be read ({e})", "a readable UTF-8 JSONL file") from None
    for number, line in enumerate(data_bytes.removeprefix(b"\xef\xbb\xbf").split(b"\n"), start=1):
        try:
            raw = line.removesuffix(b"\r").decode("utf-8")
        except UnicodeDecodeError as e:
            qa, reason = None, f"not UTF-8 ({e.reason} at byte {e.start})"
        else:
            if not raw.strip():
                continue
            qa, reason = _parse(raw, number, root)
        if qa is not None and check_images:
            if qa.image not in image_ok:
                image_ok[qa.image] = _image_problem(qa.image, sizes)
            reason = image_ok[qa.image]
        if reason is None:
            items.append(qa)
            continue
        if strict:
            raise SleighError(f"{path}:{number}", reason, EXPECTED_LINE + " with an existing, readable image")
        kind = reason.split(" (")[0]
        skipped[kind] += 1
        skipped_lines.append((number, kind))
        first.setdefault(kind, number)
        detail.setdefault(kind, f"line {number}: {reason}")
    if not items:
        counts = ", ".join(f"{n} {r}" for r, n in sorted(skipped.items()))
        firsts = "; ".join(detail[r] for r in sorted(skipped))
        raise SleighError(str(path), f"has no usable lines ({counts}; {firsts})" if skipped else "has no usable lines",
                          EXPECTED_LINE)
    return QAData(path, items, skipped, first, sizes, skipped_lines)


def _parse(raw: str, number: int, root: Path) -> tuple[QA | None, str | None]:
    try:
        d = json.loads(raw)
    except json.JSONDecodeError as e:
        return None, f"bad JSON ({e.msg})"
    if not isinstance(d, dict):
        return None, "bad JSON (not an object)"
    for key in ("image", "question", "answer"):
        if key not in d:
            return None, f"missing field ({key!r})"
        if not isinstance(d[key], str):
            return None, f"wrong type ({key!r} is {type(d[key]).__name__}, not a string)"
    if d.get("type") is not None and not isinstance(d["type"], str):  # null: absent, as pandas writes a gap
        return None, f"wrong type ('type' is {type(d['type']).__name__}, not a string)"
    if not d["answer"].strip():
        return None, "empty answer"
    if not d["question"].strip():
        return None, "empty question"
    if not d["image"]:  # Path("") is the JSONL's own folder: "image not a file" named the wrong fault
        return None, "empty image path"
    image = Path(d["image"])
    return QA(number, image if image.is_absolute() else root / image, d["question"], d["answer"].strip(),
              d.get("type") or UNTYPED, _labels(d.get("meta"))), None


_STRING, _NUMBER, _POSITIVE = (KINDS[k][0] for k in ("string", "number", "positive"))
META_LABELS = {  # what train and eval read from `meta`, and the form each must have
    "colour": _STRING, "shape": _STRING, "position": _STRING,
    "box": lambda v: isinstance(v, list) and len(v) == 4 and all(map(_NUMBER, v)),
    "size": lambda v: isinstance(v, list) and len(v) == 2 and all(map(_POSITIVE, v)),
}


def _labels(meta) -> dict:
    """`meta` without the known labels of the wrong form (a box of strings would fail in eval's tile
    count, a list colour in training's label lookup)."""
    if not isinstance(meta, dict):
        return {}
    return {k: v for k, v in meta.items() if k not in META_LABELS or META_LABELS[k](v)}


def _image_problem(path: Path, sizes: dict) -> str | None:
    """What is wrong with an image file, None if nothing (its header's size then in `sizes`)."""
    if not path.exists():
        return f"missing image ({path})"
    if not path.is_file():
        return f"image not a file ({path})"
    try:
        with warnings.catch_warnings():  # a large header: the run's own pixel limit judges it
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                sizes[path] = oriented_size(im)  # the header parsed; the size the runtime tiles
    except Image.DecompressionBombError as e:  # past Pillow's own limit: no run would open it
        return f"image too large to open ({path}: {first_line(e)})"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return f"unreadable image ({path}: {type(e).__name__})"
    return None
