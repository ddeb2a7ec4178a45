"""Random mutations of real files: the image loader and the manifest reader never crash.

Every input either loads or raises SleighError (printed by the CLI as one `error:` line, exit code
2); any other exception would reach the user as an `unexpected` line. The seeds are real files: the
oracle's astronaut.png, examples/chelsea.jpg and the manifest.json of an exported tiny package. The
mutations are the ones file fuzzers use (byte flips, interesting 32-bit values such as image
dimensions, insertions, deletions, truncation) plus, for the manifest, JSON-aware ones (a key
removed, a value of another type or a path outside the package), so most cases get past the parser;
a manifest that read_manifest accepts holds a contract the runtime can use.

Run size: FUZZ_EXAMPLES below, 3,400 cases (about 25 s of CPU: 12 s for the images, 13 s for the
manifest, imports included).
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sleigh.errors import SleighError
from sleigh.runtime.image import load_image
from sleigh.runtime.manifest import Manifest, read_manifest
from sleigh.runtime.package import MANIFEST
from tests.helpers import ASTRONAUT, EXAMPLES

CHELSEA = EXAMPLES / "chelsea.jpg"
FUZZ_EXAMPLES = {"png": 800, "jpeg": 800, "manifest_bytes": 400, "manifest_json": 1400}
# Small enough that a mutated header announcing a large image is refused rather than decoded for
# seconds; the limit itself is tested in tests/runtime/test_image.py.
FUZZ_MAX_PIXELS = 2_000_000
INTERESTING_U32 = (0, 1, 2, 0x7F, 0xFF, 0x100, 0x7FFF, 0xFFFF, 65500, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                      HealthCheck.function_scoped_fixture])


def mutations(size: int, head: int = 256):
    """Lists of byte-level mutations of a file of `size` bytes, biased towards its header."""
    pos = st.one_of(st.integers(0, min(size, head) - 1), st.integers(0, size - 1))
    one = st.one_of(
        st.tuples(st.just("set"), pos, st.integers(0, 255)),
        st.tuples(st.just("u32"), pos, st.sampled_from(INTERESTING_U32), st.booleans()),
        st.tuples(st.just("insert"), pos, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("delete"), pos, st.integers(1, 64)),
        st.tuples(st.just("truncate"), pos),
    )
    return st.lists(one, min_size=1, max_size=4)


def mutate(data: bytes, ops) -> bytes:
    b = bytearray(data)
    for op, at, *args in ops:
        at = min(at, max(len(b) - 1, 0))
        if op == "set" and b:
            b[at] = args[0]
        elif op == "u32":
            b[at:at + 4] = struct.pack(">I" if args[1] else "<I", args[0])
        elif op == "insert":
            b[at:at] = args[0]
        elif op == "delete":
            del b[at:at + args[0]]
        elif op == "truncate":
            del b[at:]
    return bytes(b)


def assert_user_error(error: SleighError) -> None:
    message = str(error)
    assert " | " in message and "\n" not in message, message
    assert not message.startswith("unexpected"), message


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory(prefix="sleigh-fuzz-") as d:
        yield Path(d)


def fix_png_crcs(data: bytes) -> bytes:
    """Recompute the CRC of every chunk whose frame is intact, so a mutation reaches the decoder
    instead of stopping at Pillow's checksum test."""
    b = bytearray(data)
    at = 8  # after the signature
    while at + 12 <= len(b):
        (length,) = struct.unpack(">I", b[at:at + 4])
        end = at + 8 + length
        if end + 4 > len(b):
            break
        b[end:end + 4] = struct.pack(">I", zlib.crc32(b[at + 4:end]))
        at = end + 4
    return bytes(b)


def _fuzz_image(seed: Path, suffix: str, examples: int):
    original = seed.read_bytes()

    @settings(FUZZ, max_examples=examples)
    @given(ops=mutations(len(original)), fix_crcs=st.booleans())
    def check(scratch, ops, fix_crcs):
        path = scratch / f"fuzzed{suffix}"
        data = mutate(original, ops)
        path.write_bytes(fix_png_crcs(data) if fix_crcs and suffix == ".png" else data)
        try:
            image = load_image(path, max_pixels=FUZZ_MAX_PIXELS)
        except SleighError as e:
            assert_user_error(e)
            return
        assert image.mode == "RGB" and image.width * image.height <= FUZZ_MAX_PIXELS
        image.getpixel((0, 0))  # decoded, not lazy

    return check


test_fuzz_png = _fuzz_image(ASTRONAUT, ".png", FUZZ_EXAMPLES["png"])
test_fuzz_jpeg = _fuzz_image(CHELSEA, ".jpg", FUZZ_EXAMPLES["jpeg"])


# -- manifest.json --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_pkg(tiny_pkg, scratch) -> Path:
    """A copy of the exported tiny package whose manifest.json each case overwrites."""
    dst = scratch / "pkg"
    shutil.copytree(tiny_pkg, dst)
    return dst


def _paths(node, prefix=()):
    """Every key path of a JSON tree (list items by index), the root excluded."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield prefix + (key,)
        yield from _paths(child, prefix + (key,))


ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
    st.sampled_from(["../../../etc/passwd", "/etc/passwd", "", ".", "..", "decoder.onnx", "engines/../../x", "\u0000",
                     "vision.onnx/..", 2, 3, "sleigh.package", {"file": "/etc/hostname"}]),
)


def _edit(tree, path, action, value):
    *parents, last = path
    node = tree
    for key in parents:
        node = node[key]
    if action == "delete":
        del node[last]
    else:
        node[last] = value


def _read(pkg: Path) -> None:
    """read_manifest: a manifest it accepts holds a typed contract; anything else is a SleighError."""
    try:
        manifest = read_manifest(pkg)
        assert isinstance(manifest, Manifest) and manifest.contract.kv_cache.num_layers >= 1
    except SleighError as e:
        assert_user_error(e)


@pytest.mark.slow
def test_fuzz_manifest_json(fuzz_pkg):
    """JSON-aware mutations: keys removed, values replaced by others of any type."""
    original = json.loads((fuzz_pkg / MANIFEST).read_text())
    paths = sorted(_paths(original), key=repr)

    @settings(FUZZ, max_examples=FUZZ_EXAMPLES["manifest_json"])
    @given(data=st.data())
    def check(data):
        tree = json.loads(json.dumps(original))
        for _ in range(data.draw(st.integers(1, 3))):
            live = [p for p in paths if _has(tree, p)]
            path = data.draw(st.sampled_from(live))
            _edit(tree, path, data.draw(st.sampled_from(["delete", "replace"])), data.draw(ODD_VALUES))
        (fuzz_pkg / MANIFEST).write_text(json.dumps(tree))
        _read(fuzz_pkg)

    check()


def test_fuzz_manifest_bytes(fuzz_pkg):
    """Byte-level mutations of the same file: broken JSON, broken UTF-8, truncation."""
    original = (fuzz_pkg / MANIFEST).read_bytes()

    @settings(FUZZ, max_examples=FUZZ_EXAMPLES["manifest_bytes"])
    @given(ops=mutations(len(original), head=len(original)))
    def check(ops):
        (fuzz_pkg / MANIFEST).write_bytes(mutate(original, ops))
        _read(fuzz_pkg)

    check()


def _has(tree, path) -> bool:
    node = tree
    for key in path:
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and isinstance(key, int) and 0 <= key < len(node):
            node = node[key]
        else:
            return False
    return True


def test_mutate_applies_each_operation():
    data = bytes(range(10))
    assert mutate(data, [("set", 0, 99)])[:2] == bytes([99, 1])
    assert mutate(data, [("u32", 2, 0xFFFFFFFF, True)])[2:6] == b"\xff" * 4
    assert mutate(data, [("insert", 1, b"ab")])[:4] == b"\x00ab\x01"
    assert mutate(data, [("delete", 0, 3)]) == data[3:]
    assert mutate(data, [("truncate", 4)]) == data[:4]
    assert mutate(b"", [("set", 0, 1), ("delete", 0, 1)]) == b""


def test_fix_png_crcs_makes_a_mutated_png_pass_the_checksum():
    import io

    from PIL import Image, UnidentifiedImageError

    original = ASTRONAUT.read_bytes()
    mutated = mutate(original, [("set", 18, original[18] ^ 1)])  # the width's second byte, in IHDR
    assert fix_png_crcs(original) == original
    with pytest.raises(UnidentifiedImageError):
        Image.open(io.BytesIO(mutated))  # the header's checksum fails
    with Image.open(io.BytesIO(fix_png_crcs(mutated))) as img:
        assert img.size == (512 ^ 256, 512)  # the mutated header is read
