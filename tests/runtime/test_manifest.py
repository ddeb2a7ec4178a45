"""The typed manifest (runtime/manifest.py): every field written is read, one contract for packages and
checkpoints, the model's own system message, older schemas refused with one line, and
`update_manifest` atomic and serialised. Field-by-field type errors and path confinement are in
test_package.py."""

from __future__ import annotations

import dataclasses
import json
import threading

import pytest

from sleigh.errors import SleighError
from sleigh.runtime.manifest import (
    Contract, FileEntry, Manifest, ModuleEntry, TensorInfo, read_manifest, update_manifest)
from sleigh.runtime.package import MANIFEST, SCHEMA_VERSION, read_json
from sleigh.runtime.pipeline import Pipeline
from tests.helpers import one_error_line, run_sleigh
from tests.runtime.package_copies import copy_package, load, save


@pytest.fixture
def pkg(tiny_pkg, tmp_path):
    return copy_package(tiny_pkg, tmp_path)


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_every_field_export_writes_is_a_field_the_reader_reads(tiny_pkg):
    """The JSON keys `sleigh export` writes, section by section, are exactly the typed fields: nothing
    is written that nothing reads, and nothing read is missing."""
    raw = json.loads((tiny_pkg / MANIFEST).read_text())
    assert set(raw) == set(Manifest.TOP_LEVEL)
    contract = read_manifest(tiny_pkg).contract
    for section in Contract.SECTIONS:
        typed = getattr(contract, section)
        assert typed is not None, section  # the tiny model has GSWA: every section is written
        assert set(raw[section]) == _fields(type(typed)), section
    assert set(raw["tokenizer"]) == {"file"}
    for name, module in raw["modules"].items():
        assert set(module) == _fields(ModuleEntry), name
        for t in module["inputs"] + module["outputs"]:
            assert set(t) == _fields(TensorInfo), (name, t)
    for rel, entry in raw["files"].items():
        assert set(entry) == _fields(FileEntry), rel
    typed_top = _fields(Manifest) - {"root", "json", "contract", "schema_version"}
    assert typed_top | set(Contract.SECTIONS) | {"schema", "schema_version"} == set(Manifest.TOP_LEVEL)


def test_a_checkpoint_and_its_package_have_one_contract(tiny_ckpt, tiny_pkg):
    """The runtime derives a checkpoint's contract from config.json with the function export writes it with."""
    config = read_json(tiny_ckpt / "config.json", "config.json")
    assert Contract.from_config(config, "config.json") == read_manifest(tiny_pkg).contract
    c = read_manifest(tiny_pkg).contract
    assert c.prompt.tokens_per_view == (config["vision"]["image_size"] // config["vision"]["patch_size"]) ** 2 // 4
    assert c.kv_cache.num_layers == config["llm"]["num_layers"]
    assert c.image.max_views == c.image.max_tiles + 1  # the thumbnail


@pytest.mark.parametrize("path, value, words", [
    (("vision", "image_size"), 450, "vision image_size 450 / patch_size 14 is not an even whole number"),
    (("llm", "hidden_size"), 65, "do not divide"),
    (("llm", "num_layers"), "2", "llm.num_layers is the string '2'"),
    (("image", "mean"), [0.5, 0.5], "three numbers each"),
    (("gswa", "apply"), "mystery", "gswa.apply is 'mystery'"),
    (("prompt", "stop_token_ids"), [-1], "prompt.stop_token_ids[0] is the integer -1"),
])
def test_a_bad_config_is_one_error_naming_the_field(tiny_ckpt, path, value, words):
    config = read_json(tiny_ckpt / "config.json", "config.json")
    config[path[0]][path[1]] = value
    with pytest.raises(SleighError) as err:
        Contract.from_config(config, "ckpt/config.json")
    assert words in str(err.value) and str(err.value).startswith("ckpt/config.json")


@pytest.mark.parametrize("section", Contract.SECTIONS)
def test_a_missing_contract_section_is_one_error_naming_it(pkg, section):
    manifest = load(pkg)
    del manifest[section]
    save(pkg, manifest)
    with pytest.raises(SleighError, match=f"{section} is missing.*re-export"):
        read_manifest(pkg)


def test_the_prompt_uses_the_manifests_system_message(pkg):
    """A model with another system message carries it in its package; the caller's own still wins."""
    ours = "You are a terse assistant."
    update_manifest(pkg, lambda m: m["prompt"].update(system_message=ours))
    pipe = Pipeline.load(pkg)
    assert pipe.contract.prompt.system_message == ours
    _, ids = pipe.prepare(None, "hi")
    assert ids == pipe.tokenizer.encode_prompt("hi", 0, system=ours)
    assert ids != pipe.tokenizer.encode_prompt("hi", 0)  # not the InternVL default
    _, given = pipe.prepare(None, "hi", system="")
    assert given == pipe.tokenizer.encode_prompt("hi", 0, system="")
    backend = pipe.backend  # and the cache names are the manifest's, not rebuilt from strings
    assert (backend._past_names, backend._new_names) == (list(pipe.contract.kv_cache.past), list(pipe.contract.kv_cache.new))


def test_a_package_of_the_previous_schema_is_refused_with_one_line(pkg):
    """A schema-3 package (model_config, no contract sections) asks for a re-export, and says how."""
    manifest = load(pkg)
    for section in ("model", "kv_cache"):
        del manifest[section]
    manifest.update(schema_version=SCHEMA_VERSION - 1, model_config={"llm": {}, "vision": {}})
    save(pkg, manifest)
    line = one_error_line(run_sleigh("run", "--model", pkg, "--prompt", "hi", "--max-new-tokens", "1"))
    assert f"schema_version {SCHEMA_VERSION - 1} is from an older sleigh" in line
    assert "re-export" in line and "sleigh export" in line


# -- update_manifest ----------------------------------------------------------------------------------

def _leftovers(pkg) -> list[str]:
    return sorted(p.name for p in pkg.iterdir() if p.name.startswith(f".{MANIFEST}."))


def test_update_manifest_leaves_the_manifest_as_it_was_on_any_failure(pkg):
    before = (pkg / MANIFEST).read_bytes()

    def boom(m):
        m["parity"] = None
        raise RuntimeError("the writer failed halfway")

    with pytest.raises(RuntimeError):
        update_manifest(pkg, boom)
    with pytest.raises(SleighError, match="image.max_tiles is the integer 0"):  # nothing unreadable is written
        update_manifest(pkg, lambda m: m["image"].update(max_tiles=0))

    def disk_full():
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):  # the new manifest was complete on disk and never replaced the old one
        update_manifest(pkg, lambda m: m.update(parity={"passed": True}), before_replace=disk_full)
    assert (pkg / MANIFEST).read_bytes() == before
    assert _leftovers(pkg) == []


def test_update_manifest_writes_the_change_and_returns_it(pkg):
    entry = {"method": "entropy", "images": ["a.jpg"]}
    written = update_manifest(pkg, lambda m: {**m, "calibration": entry})  # a new object works too
    assert written.calibration == read_manifest(pkg).calibration
    assert written.calibration.method == "entropy" and written.calibration.images == ("a.jpg",)
    assert written.contract == read_manifest(pkg).contract


def test_concurrent_updates_lose_nothing(pkg):
    """Writers that overlap (calibrate and build-engine on one package) each see the other's change."""
    start = threading.Barrier(6)
    errors = []

    def writer(i: int) -> None:
        try:
            start.wait()
            for j in range(3):
                update_manifest(pkg, lambda m, k=f"w{i}.{j}": m.update(parity={**(m["parity"] or {}), k: True}))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    parity = read_manifest(pkg).parity
    assert {f"w{i}.{j}" for i in range(6) for j in range(3)} <= set(parity)
    assert _leftovers(pkg) == []
