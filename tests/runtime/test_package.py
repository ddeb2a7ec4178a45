"""The manifest reader (every field the runtime reads, with its type; any bytes give a SleighError),
paths confined to the package, and the integrity check before a run (sizes always, sha256 once per
file version)."""

from __future__ import annotations

import json
import os
import shutil

import pytest

import sleigh.runtime.package as package
from sleigh.errors import SleighError
from sleigh.runtime.manifest import read_manifest
from sleigh.runtime.package import MANIFEST, VERIFIED
from sleigh.runtime.pipeline import Pipeline
from tests.helpers import one_error_line, run_sleigh
from tests.runtime.package_copies import add_engine, copy_package, load, save

DELETE = object()


@pytest.fixture
def pkg(tiny_pkg, tmp_path):
    return copy_package(tiny_pkg, tmp_path)


def edited(pkg, path: tuple, value):
    """The package with manifest[path...] set to `value` (or deleted)."""
    manifest = load(pkg)
    *parents, key = path
    obj = manifest
    for p in parents:
        obj = obj[p]
    if value is DELETE:
        del obj[key]
    else:
        obj[key] = value
    save(pkg, manifest)
    return pkg


# (field path, new value, words the one error line must hold). Each used to pass read_manifest and fail
# later as KeyError/TypeError/IndexError ("unexpected"), or to run with a wrong value.
BAD_FIELDS = [
    (("model",), DELETE, "model is missing"),
    (("tokenizer",), DELETE, "tokenizer is missing"),
    (("kv_cache", "num_kv_heads"), DELETE, "kv_cache.num_kv_heads is missing"),
    (("kv_cache", "head_dim"), "2", "kv_cache.head_dim is the string '2'"),
    (("kv_cache", "past"), ["past_key_values.0.key"], "lists 1 past and 4 new names"),
    (("kv_cache", "new", 0), "new_key_values.9.key", "['new_key_values.9.key'] that are not among modules.decoder.outputs"),
    (("model", "hidden_size"), 0, "model.hidden_size is the integer 0"),
    (("image", "max_tiles"), True, "image.max_tiles is the boolean True"),
    (("image", "min_tiles"), 13, "min_tiles 13 > max_tiles 12"),
    (("image", "mean"), [0.5, 0.5], "three numbers each"),
    (("image", "std"), [0.2, "x", 0.2], "image.std[1]"),
    (("image", "thumbnail"), "yes", "image.thumbnail"),
    (("image", "resample"), "nearest", "image.resample is 'nearest'"),
    (("prompt", "template"), "chatml", "prompt.template is 'chatml'"),
    (("prompt", "system_message"), 3, "prompt.system_message is the integer 3"),
    (("prompt", "system_message"), DELETE, "prompt.system_message is missing"),
    (("generation", "stop_token_ids"), "2", "generation.stop_token_ids is the string"),
    (("prompt", "img_context_token_id"), -1, "img_context_token_id is the integer -1"),
    (("gswa", "apply"), "mystery", "gswa.apply is 'mystery'"),
    (("gswa", "min_weight"), 2, "min_weight is 2"),
    (("model",), [], "model is a list"),
    (("modules", "decoder", "inputs", 0, "shape"), [1.5], "modules.decoder.inputs[0].shape[0] is the number 1.5"),
    (("files",), [], "files is a list"),
    (("files", "vision.onnx", "bytes"), "734976", "files.vision.onnx.bytes is the string"),
    (("files", "vision.onnx", "sha256"), "xyz", "files.vision.onnx.sha256"),
    (("files", "vision.onnx"), None, "files.vision.onnx is null"),
    (("files", "tokenizer.json"), DELETE, "'tokenizer.json' is not listed in files"),
    (("modules", "decoder"), DELETE, "modules ['decoder'] are missing"),
    (("modules", "decoder", "file"), 5, "modules.decoder.file is the integer 5"),
    (("modules", "decoder", "data_files"), "decoder.onnx.data", "modules.decoder.data_files is the string"),
    (("modules", "decoder", "inputs"), {}, "modules.decoder.inputs is an object"),
    (("modules", "decoder", "outputs", 0, "name"), DELETE, "modules.decoder.outputs[0].name is missing"),
    (("modules", "vision", "file"), "other.onnx", "'other.onnx' is not listed in files"),
    (("engines",), [], "engines is a list"),
    (("engines", "x"), "fp16", "engines.x is the string"),
    (("image",), DELETE, "image is missing"),
    (("image", "max_tiles"), 0, "image.max_tiles is the integer 0"),
    (("generation", "context_length"), -1, "generation.context_length"),
    (("prompt", "tokens_per_view"), None, "prompt.tokens_per_view is null"),
    (("parity",), [], "parity is a list"),
    (("calibration",), [], "calibration is a list"),
    (("calibration",), {"method": "entropy", "images": "a.jpg"}, "calibration.images is the string"),
    (("calibration",), {"images": []}, "calibration.method is missing"),
    (("created_by",), "me", "created_by is the string"),
    (("schema",), "other", "not a Sleigh package manifest"),
    (("schema_version",), "2", "schema_version is the string '2'"),
    (("schema_version",), True, "schema_version is the boolean"),
    # the contract against the modules' recorded inputs (each ran into ONNX Runtime's own error)
    (("image", "size"), 224, "image.size is 224, but modules.vision takes pixel_values with 448 on axis 2"),
    (("model", "hidden_size"), 32, "model.hidden_size is 32, but modules.embed takes image_embeds with 64"),
    (("kv_cache", "num_kv_heads"), 3, "kv_cache.num_kv_heads is 3, but modules.decoder takes past_key_values.0.key with 2"),
    (("kv_cache", "head_dim"), 8, "kv_cache.head_dim is 8, but modules.decoder takes past_key_values.0.key with 16"),
    (("kv_cache", "form"), "shared", "kv_cache.form is 'shared', but the decoder lacks input_ids"),
    (("image", "max_tiles"), 10**18, "image.max_tiles is 1000000000000000000. Expected: at most 40"),
    # session 25: both passed `inspect --verify`, compare and build-engine (the tiny vocabulary is 1024)
    (("generation", "stop_token_ids"), [2, 99999], "generation.stop_token_ids holds 99999, past the vocabulary of"),
    (("prompt", "img_context_token_id"), 5000, "prompt.img_context_token_id holds 5000, past the vocabulary of"),
]


@pytest.mark.parametrize("path, value, words", BAD_FIELDS, ids=[f"{'.'.join(map(str, p))}={v if v is not DELETE else 'deleted'}"
                                                                 for p, v, _ in BAD_FIELDS])
def test_a_bad_field_is_one_error_naming_it(pkg, path, value, words):
    with pytest.raises(SleighError) as err:
        read_manifest(edited(pkg, path, value))
    assert words in str(err.value)
    assert str(err.value).startswith(str(pkg / MANIFEST))


def test_a_module_whose_fixed_sizes_differ_from_the_manifest_is_refused_when_opened(pkg):
    """Contract and module entry edited alike (image.size 224 and vision's pixel_values [views, 3, 224,
    224]) pass read_manifest; the vision file still takes 448, and opening it says so in one line."""
    from sleigh.runtime.pipeline import Pipeline
    from tests.helpers import ASTRONAUT

    manifest = load(pkg)
    manifest["image"]["size"] = 224
    manifest["modules"]["vision"]["inputs"][0]["shape"] = ["views", 3, 224, 224]
    save(pkg, manifest)
    with pytest.raises(SleighError) as err, Pipeline.load(pkg) as pipe:  # vision opens with the pipeline or later
        pipe.generate(ASTRONAUT, "Hi", max_new_tokens=1).result
    assert "vision.onnx | is not the vision module the manifest lists: its input pixel_values is" in str(err.value)
    assert "['views', 3, 224, 224]" in str(err.value)


def test_engine_fields_are_checked(pkg):
    add_engine(pkg, "onnxruntime-int8", "int8")
    pristine = load(pkg)
    for field, value, words in [("modules", {"vision": 3}, "engines.onnxruntime-int8.modules.vision is the integer 3"),
                                ("modules", {"vision": "engines/x/vision.onnx"}, "'engines/x/vision.onnx' is not listed"),
                                ("accuracy_passed", "yes", "engines.onnxruntime-int8.accuracy_passed"),
                                ("backend", None, "engines.onnxruntime-int8.backend is null"),
                                ("files", {"../x": {}}, "'../x' points outside"),
                                # session 25: each passed `inspect --verify`, then failed `compare` with a KeyError
                                ("modules", {}, "modules lists []. Expected: one file for each of"),
                                ("name", "other", "name is the string 'other'")]:
        engine = pristine["engines"]["onnxruntime-int8"]
        save(pkg, {**pristine, "engines": {"onnxruntime-int8": {**engine, field: value}}})
        with pytest.raises(SleighError, match="manifest.json") as err:
            read_manifest(pkg)
        assert words in str(err.value), field
        if field != "files":  # a path outside says so (test_paths_outside_the_package_are_refused)
            assert "build-engine" in str(err.value) and "re-export" not in str(err.value), field


def test_schema_versions_say_what_to_do(pkg):
    with pytest.raises(SleighError, match="upgrade sleigh") as err:
        read_manifest(edited(pkg, ("schema_version",), package.SCHEMA_VERSION + 1))
    assert "re-export" not in str(err.value)
    with pytest.raises(SleighError, match="re-export") as err:
        read_manifest(edited(pkg, ("schema_version",), package.SCHEMA_VERSION - 1))
    assert "upgrade" not in str(err.value)


# Raw manifest bytes: whatever they hold, the reader raises a SleighError and nothing else.
BAD_BYTES = {
    "empty": b"",
    "not utf-8": b"\xff\xfe\xfa garbage",
    "nul bytes": b"\x00" * 64,
    "deep nesting": b"[" * 100_000,
    "huge integer": b'{"schema_version": ' + b"1" * 5000 + b"}",
    "null": b"null",
    "a list": b"[]",
    "a string": b'"sleigh.package"',
    "NaN": b"NaN",
    "schema only": b'{"schema": "sleigh.package"}',
    "truncated": None,  # the real manifest cut in half
}


@pytest.mark.parametrize("name", BAD_BYTES)
def test_any_bytes_give_a_sleigh_error(pkg, name):
    raw = BAD_BYTES[name]
    if raw is None:
        raw = (pkg / MANIFEST).read_bytes()[: (pkg / MANIFEST).stat().st_size // 2]
    (pkg / MANIFEST).write_bytes(raw)
    with pytest.raises(SleighError):
        read_manifest(pkg)


def test_a_manifest_that_is_a_folder_or_missing(pkg):
    (pkg / MANIFEST).unlink()
    with pytest.raises(SleighError, match="no manifest.json"):
        read_manifest(pkg)
    (pkg / MANIFEST).mkdir()
    with pytest.raises(SleighError, match="no manifest.json"):
        read_manifest(pkg)



@pytest.mark.parametrize("command", [("run", "--prompt", "hi"), ("bench", "--runs", "1"), ("eval", "--data"),
                                     ("serve", "--port", "1")])
def test_every_command_tells_a_package_from_a_checkpoint_by_one_rule(pkg, tmp_path, command):
    """runtime.package.model_kind: a manifest (or, where it is missing, .onnx files: an unfinished
    export, whose reading says so) is a package, a config.json a checkpoint, neither one line, before
    anything loads; the same in every command that takes a model."""
    from sleigh.runtime.package import model_kind

    assert model_kind(pkg) == "package"
    (pkg / MANIFEST).unlink()
    assert model_kind(pkg) == "package"
    name, *rest = command
    if name == "eval":  # data that passes eval's own checks, which come first
        from PIL import Image

        Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
        (tmp_path / "d.jsonl").write_text('{"image": "a.png", "question": "Colour?", "answer": "black"}\n')
        rest.append(str(tmp_path / "d.jsonl"))
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(SleighError, match=r"neither manifest\.json nor config\.json found"):
        model_kind(bare)
    model = ["--model", str(pkg)] if name in ("run", "serve") else [str(pkg)]
    assert "no manifest.json" in one_error_line(run_sleigh(name, *model, *rest))
    model = ["--model", str(bare)] if name in ("run", "serve") else [str(bare)]
    assert "neither manifest.json nor config.json found" in one_error_line(run_sleigh(name, *model, *rest))


def test_runs_started_together_keep_each_others_hashes(pkg):
    """Each run reads the cache, hashes its own files, and writes: the last writer once kept only its own
    records (runs of two engines started together on a fresh package hashed again next time)."""
    from sleigh.runtime.package import _HashCache

    first, second = _HashCache(pkg), _HashCache(pkg)  # both read the cache before either writes
    for cache, rel in ((first, "decoder.onnx"), (second, "vision.onnx")):
        cache.sha256(rel, pkg / rel, (pkg / rel).stat())
    first.save()
    second.save()
    assert {"decoder.onnx", "vision.onnx"} <= set(json.loads((pkg / VERIFIED).read_text())["files"])


# -- confinement ------------------------------------------------------------------------------------

def _outside_copy(pkg):
    """A valid module file outside the package (what an attacker's manifest would point at)."""
    other = pkg.parent / "elsewhere"
    other.mkdir(exist_ok=True)
    shutil.copy(pkg / "decoder.onnx", other / "decoder.onnx")
    return other / "decoder.onnx"


ESCAPES = {"dotdot": lambda pkg, f: os.path.relpath(f, pkg), "absolute": lambda pkg, f: str(f),
           "etc": lambda pkg, f: "/etc/passwd", "symlink": None}


@pytest.mark.parametrize("escape", ESCAPES)
@pytest.mark.parametrize("field", ["modules.decoder.file", "modules.decoder.data_files", "tokenizer.file", "files",
                                   "engines.modules", "engines.dir"])
def test_paths_outside_the_package_are_refused(pkg, field, escape):
    outside = _outside_copy(pkg)
    if escape == "symlink":
        (pkg / "inside-link.onnx").symlink_to(outside)
        rel = "inside-link.onnx"
    else:
        rel = ESCAPES[escape](pkg, outside)
    add_engine(pkg, "onnxruntime-int8", "int8")
    manifest = load(pkg)
    entry = package.file_entry(pkg.parent, str(outside.relative_to(pkg.parent)))  # size and sha256 that match
    manifest["files"][rel] = entry  # listed, so only the confinement check can refuse it
    engine = manifest["engines"]["onnxruntime-int8"]
    if field == "modules.decoder.file":
        manifest["modules"]["decoder"]["file"] = rel
    elif field == "modules.decoder.data_files":
        manifest["modules"]["decoder"]["data_files"] = [rel]
    elif field == "tokenizer.file":
        manifest["tokenizer"]["file"] = rel
    elif field == "engines.modules":
        engine["modules"]["decoder"] = rel
    elif field == "engines.dir":
        engine["dir"] = rel
    save(pkg, manifest)
    with pytest.raises(SleighError) as err:
        read_manifest(pkg)
    msg = str(err.value)
    assert repr(rel)[:100] in msg and ("outside the folder" in msg or "absolute path" in msg), msg
    if escape == "symlink":
        assert "through a symlink" in msg


def test_inside_refuses_what_is_not_a_relative_file_name(tmp_path):
    for rel in ["", None, 3, "a\0b", "/abs", ".", "a/../..", "\ud800.onnx"]:
        with pytest.raises(SleighError):
            package.inside(tmp_path, rel, "field")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(SleighError):
        package.inside(tmp_path, "loop", "field")
    assert package.inside(tmp_path, "a/b.onnx", "field") == tmp_path / "a" / "b.onnx"
    assert package.inside(tmp_path, "a/../b.onnx", "field") == tmp_path / "a/../b.onnx"  # stays inside


def test_run_never_loads_a_model_from_outside(pkg):
    """The attack of the hardening issue: a manifest pointing `run` at a decoder elsewhere."""
    outside = _outside_copy(pkg)
    rel = os.path.relpath(outside, pkg)
    manifest = load(pkg)
    manifest["modules"]["decoder"]["file"] = rel
    manifest["files"][rel] = manifest["files"]["decoder.onnx"]
    save(pkg, manifest)
    line = one_error_line(run_sleigh("run", "--model", pkg, "--max-new-tokens", "2"))
    assert "points outside the folder" in line and not line.startswith("error: unexpected")


# -- integrity ----------------------------------------------------------------------------------------

def _flip(path):
    """Flip one bit inside the largest weight of an ONNX file: the graph still loads, the numbers change."""
    import onnx

    data = bytearray(path.read_bytes())
    raw = max((t.raw_data for t in onnx.load_from_string(bytes(data)).graph.initializer), key=len)
    start = data.find(raw)
    assert len(raw) > 64 and start >= 0
    data[start + len(raw) // 2] ^= 1
    path.write_bytes(data)


def test_a_flipped_byte_stops_the_run_and_the_opt_out_skips_the_hash(pkg):
    _flip(pkg / "decoder.onnx")
    with pytest.raises(SleighError, match="decoder.onnx") as err:
        Pipeline.load(pkg)
    assert "sha256 differs" in str(err.value) and "sleigh export" in str(err.value)
    Pipeline.load(pkg, verify=False).generate(None, "hi", max_new_tokens=2).result  # opted out: runs


def test_a_flipped_byte_is_one_error_line_and_the_flag_opts_out(pkg):
    _flip(pkg / "decoder.onnx")
    line = one_error_line(run_sleigh("run", "--model", pkg, "--max-new-tokens", "2"))
    assert "decoder.onnx" in line and "sha256" in line
    proc = run_sleigh("run", "--model", pkg, "--max-new-tokens", "2", "--no-verify-files")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("damage", ["truncated", "grown", "deleted", "folder"])
def test_sizes_are_checked_even_without_hashes(pkg, damage):
    path = pkg / "vision.onnx"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-1])
    elif damage == "grown":
        path.write_bytes(path.read_bytes() + b"\0")
    else:
        path.unlink()
        if damage == "folder":
            path.mkdir()
    with pytest.raises(SleighError, match="vision.onnx") as err:
        Pipeline.load(pkg, verify=False)
    assert "re-export" in str(err.value)


def test_a_damaged_tokenizer_is_caught(pkg):
    path = pkg / "tokenizer.json"
    text = path.read_text()
    path.write_text(text.replace('"<s>"', '"<S>"', 1))  # still a valid tokenizer, one token renamed
    with pytest.raises(SleighError, match=r"tokenizer.json \| its sha256 differs"):
        Pipeline.load(pkg)


def _count_hashes(monkeypatch):
    hashed = []
    real = package.sha256_file

    def counting(path, *a, **k):
        hashed.append(path.name)
        return real(path, *a, **k)

    monkeypatch.setattr(package, "sha256_file", counting)
    return hashed


def test_hashes_are_computed_once_per_file_version(pkg, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    hashed = _count_hashes(monkeypatch)
    Pipeline.load(pkg)
    assert sorted(hashed) == sorted(load(pkg)["files"])  # the 3 modules and the tokenizer: every file once
    assert (pkg / VERIFIED).is_file()
    hashed.clear()
    Pipeline.load(pkg)
    assert hashed == []  # the second run reads no file
    os.utime(pkg / "embed.onnx")  # a new mtime: a new version to hash
    Pipeline.load(pkg)
    assert hashed == ["embed.onnx"]


def test_a_change_that_keeps_size_and_mtime_is_still_caught(pkg, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    Pipeline.load(pkg)  # hashed and cached
    path = pkg / "decoder.onnx"
    st = path.stat()
    _flip(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: only ctime moved
    with pytest.raises(SleighError, match="sha256 differs"):
        Pipeline.load(pkg)


def test_the_cache_never_fails_a_run(pkg, monkeypatch, tmp_path):
    hashed = _count_hashes(monkeypatch)
    (pkg / VERIFIED).mkdir()  # the package's cache cannot be written (as on a read-only package) ...
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    Pipeline.load(pkg)
    assert list((tmp_path / "xdg" / "sleigh" / "verified").glob("*.json"))  # ... so it went to $XDG_CACHE_HOME
    hashed.clear()
    Pipeline.load(pkg)
    assert hashed == []
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))  # nowhere to write at all: still runs
    Pipeline.load(pkg)
    (pkg / VERIFIED).rmdir()
    (pkg / VERIFIED).write_bytes(b"\xff not json")  # a damaged cache is no cache
    Pipeline.load(pkg)
    assert json.loads((pkg / VERIFIED).read_text())["files"]


def test_a_forged_cache_entry_is_not_trusted_for_another_file_version(pkg, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    Pipeline.load(pkg)
    _flip(pkg / "decoder.onnx")  # new mtime: the recorded (good) sha256 belongs to the old version
    with pytest.raises(SleighError, match="sha256 differs"):
        Pipeline.load(pkg)


def test_a_module_swapped_for_another_valid_onnx_is_one_error_line(pkg):
    """embed.onnx copied over decoder.onnx, with its size and sha256 in the manifest too: the names differ."""
    shutil.copy(pkg / "embed.onnx", pkg / "decoder.onnx")
    manifest = load(pkg)
    manifest["files"]["decoder.onnx"] = manifest["files"]["embed.onnx"]
    save(pkg, manifest)
    line = one_error_line(run_sleigh("run", "--model", pkg, "--max-new-tokens", "2"))
    assert "decoder.onnx" in line and "is not a decoder module" in line and not line.startswith("error: unexpected")
    with pytest.raises(SleighError, match="is not a decoder module"):
        Pipeline.load(pkg, verify=False)


@pytest.mark.parametrize("path, value", [(("kv_cache", "num_kv_heads"), DELETE), (("tokenizer",), DELETE),
                                         (("model",), DELETE), (("files", "decoder.onnx", "bytes"), "big")])
def test_cli_bad_manifest_is_one_user_error_line(pkg, path, value):
    proc = run_sleigh("run", "--model", edited(pkg, path, value), "--max-new-tokens", "2")
    line = one_error_line(proc)
    assert proc.returncode == 2 and not line.startswith("error: unexpected") and "manifest.json" in line


def test_external_data_the_manifest_does_not_list_is_refused(pkg):
    """A manifest edited to drop a module's `.data` file (or a stale one left beside it): ONNX Runtime
    would read weights no sha256 covers, and `inspect --verify` said all matched."""
    (pkg / "decoder.onnx.data").write_bytes(b"\0" * 64)
    problems = package.verify_files(pkg, read_manifest(pkg))
    assert problems == ["decoder.onnx.data: not listed in the manifest, and decoder.onnx reads it"]
    with pytest.raises(SleighError, match=r"decoder\.onnx\.data \| decoder\.onnx reads it and the manifest does not list it"):
        Pipeline.load(pkg)
