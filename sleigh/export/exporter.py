"""`sleigh export`: a Sleigh checkpoint -> a model package (DESIGN.md, "The model package").

Order of work, so that an interrupted or failed export never looks complete and never costs the
previous package: modules and tokenizer into a staging folder beside the output (sleigh/staging.py)
-> parity on the staged modules -> manifest last -> the staging folder swapped into place. A parity
failure leaves the output as it was and the failed export, with parity_report.json, at OUT.parity-failed.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import time
import warnings
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

from sleigh.errors import SleighError, first_line
from sleigh.onnx_files import EXTERNAL_DATA_BYTES, describe_io, versions
from sleigh.progress import progress
from sleigh.runtime.image import INTERNVL_MAX_TILES, TILES_LIMIT
from sleigh.runtime.manifest import Contract, contract_from_config, write_manifest
from sleigh.runtime.package import (MANIFEST, SCHEMA, SCHEMA_VERSION, TOKENIZER, file_entry, ordinary_modes, sha256_file, shipped_photo,
                                   write_json_atomic)
from sleigh.runtime.prompt import PromptTokenizer

OPSET_RANGE = (18, 20)  # opset 23 fuses into ops that TensorRT parsers before 10.15 cannot read


@dataclass
class ExportOptions:
    opset: int = OPSET_RANGE[0]
    max_tiles: int = INTERNVL_MAX_TILES
    decoder: str = "fused"  # one of DECODER_FORMS
    verify: bool = True
    force: bool = False
    quiet: bool = False
    parity_image: Path | None = None  # default: the photo shipped with sleigh
    isolate: bool | None = None  # modules exported in a child process; None: when the weights pass ISOLATE_BYTES


# A checkpoint with more weights than this exports its modules in a child process. torch's exporter
# keeps tensors alive from C++ after it returns, and they pin the whole mapped checkpoint: at full size
# 9 GB stayed resident through parity beside the FP32 decoder's session (17.5 GB peak, RESULTS.md,
# "Session 10"). A child gives everything back when it exits; it costs a torch import and a load (~5 s).
ISOLATE_BYTES = 1 << 30
SEED = 0  # torch's seed before the modules are exported, in this process or the child


@dataclass
class ExportResult:
    package: Path
    manifest: dict
    parity: list = field(default_factory=list)
    seconds: float = 0.0


# `--decoder` -> the manifest's kv_cache.form: "fused" (the default), ONNX Runtime's fused operators
# (export/fused_decoder.py: 1.2-1.6x faster prefill and 1.3-1.4x faster decode than the standard form
# on the CPU, benchmarks/RESULTS.md, "A fused decoder"; ONNX Runtime only, and its decoder runs on the
# CPU provider); "fused-cuda", the same without an attention bias, which ONNX Runtime's CUDA provider
# can run (weighted values; 6-11 % slower decode on the CPU); "standard", standard ops (every
# backend: TensorRT reads only this form).
DECODER_FORMS = {"standard": "slots", "fused": "shared", "fused-cuda": "weighted"}


def check_options(opts: ExportOptions) -> None:
    if opts.decoder not in DECODER_FORMS:
        raise SleighError(f"--decoder {opts.decoder}", "is not a decoder form", " or ".join(DECODER_FORMS))
    lo, hi = OPSET_RANGE
    if not lo <= opts.opset <= hi:
        raise SleighError(f"--opset {opts.opset}", "out of the supported range",
                          f"{lo}..{hi} (opset 23 fuses into ops TensorRT < 10.15 cannot parse)")
    if not 1 <= opts.max_tiles <= TILES_LIMIT:
        raise SleighError(f"--max-tiles {opts.max_tiles}", "out of range", f"1..{TILES_LIMIT}")


@contextmanager
def _quiet_exporter():
    """torch.onnx prints warnings and progress of its own; keep the CLI's output ours."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch._dynamo", "torch.export", "torch.fx", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def export_module(spec, out_dir: Path, opset: int, gswa_blocks: int | None) -> list[str]:
    """Export one module spec to `<name>.onnx` (+ `.onnx.data`); returns the files written."""
    import torch

    from sleigh.export import gswa_op

    external = _weight_bytes(spec.wrapper) > EXTERNAL_DATA_BYTES
    with _quiet_exporter():
        program = torch.onnx.export(spec.wrapper, spec.example, input_names=spec.input_names,
                                    output_names=spec.output_names, dynamic_shapes=spec.dynamic_shapes,
                                    dynamo=True, opset_version=opset, external_data=external, verbose=False)
    if spec.has_gswa_node:
        gswa_op.attach_function(program, gswa_blocks, opset)
    _name_nodes(program)
    path = out_dir / f"{spec.name}.onnx"
    program.save(str(path), external_data=external)
    files = [path.name]
    if external and (out_dir / f"{path.name}.data").exists():
        files.append(f"{path.name}.data")
    return files


def _name_nodes(program) -> None:
    """Nodes without a name get one, so tools and error messages can point at them."""
    for i, node in enumerate(program.model.graph):
        if not node.name:
            node.name = f"/{node.op_type}_{i}"


def source_of(checkpoint: Path) -> dict:
    """What a package is exported from: the checkpoint folder, the sha256 of its config and weights, and,
    where `sleigh train` left its state there, the run (steps, data, the checkpoint it started from)."""
    from sleigh.sleighvl.checkpoint import CONFIG, WEIGHTS
    from sleigh.sleighvl.train import STATE, run_record

    checkpoint = Path(checkpoint)
    source = {"checkpoint": str(checkpoint.resolve()), "config_sha256": sha256_file(checkpoint / CONFIG),
              "weights_sha256": sha256_file(checkpoint / WEIGHTS)}
    if (checkpoint / STATE).is_file():
        try:
            run = run_record(checkpoint / STATE)
            source["trained"] = {"steps": int(run["step"]), "data": run.get("data"), "from": run.get("source"),
                                 "train": run["options"].get("train")}
        except Exception:  # noqa: BLE001 - a damaged state says nothing about the weights, which are what is exported
            pass
    return source


def build_manifest(pkg: Path, cfg, opts: ExportOptions, modules: dict[str, list[str]], parity: dict | None,
                   source: dict | None = None) -> dict:
    """The new package's manifest (runtime/manifest.py reads it): the contract derived from the model's
    config.json by the function the runtime uses for checkpoints, then the modules and their files."""
    files = {}
    mod_entries = {}
    for name, written in modules.items():
        for f in written:
            files[f] = file_entry(pkg, f)
        mod_entries[name] = {"file": written[0], "data_files": written[1:], "precision": "fp32",
                             **{k: v for k, v in describe_io(pkg / written[0]).items() if k in ("inputs", "outputs")}}
    files[TOKENIZER] = file_entry(pkg, TOKENIZER)
    contract = contract_from_config(json.loads(json.dumps(cfg.to_dict())), max_tiles=opts.max_tiles)  # as config.json holds it
    contract["kv_cache"]["form"] = DECODER_FORMS[opts.decoder]
    if opts.decoder == "fused-cuda":  # its cache's heads are padded (export/fused_decoder.py)
        from sleigh.export.fused_decoder import padded_head_dim

        contract["kv_cache"]["head_dim"] = padded_head_dim(contract["kv_cache"]["head_dim"])
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created_by": versions("torch"),
        "source": source,
        "opset": opts.opset,
        **contract,
        "tokenizer": {"file": TOKENIZER},
        "modules": mod_entries,
        "files": files,
        "parity": parity,
        "calibration": None,
        "engines": {},
    }


def _free_weights(model) -> None:
    """Drop the model's weights once parity has its references (only the config is used after it),
    and hand the freed heap back to the OS: at full size the decoder's session then opens beside
    no torch weights."""
    import gc

    from sleigh.runtime.compat import trim_heap

    model.to("meta")
    gc.collect()
    trim_heap()


def _weight_bytes(model) -> int:
    """A module's parameters' bytes."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _export_one(model, name: str, out_dir: Path, opts: ExportOptions) -> list[str]:
    """Module `name` of `model` into `out_dir`; returns the files written."""
    from sleigh.export import fused_decoder
    from sleigh.export.modules import MODULES

    fused = name == "decoder" and opts.decoder != "standard"
    try:
        if fused:
            return fused_decoder.write(model.llm, out_dir, opts.opset, weighted_values=opts.decoder == "fused-cuda")
        return export_module(MODULES[name](model), out_dir, opts.opset, len(model.gswa.blocks) if model.gswa else None)
    except Exception as e:  # torch.export errors are long; keep the first line
        how = "writing the fused decoder" if fused else "torch.onnx.export"
        raise SleighError(f"export {name}", f"{how} failed ({first_line(e)})",
                          "a checkpoint of a supported architecture") from e


_child_model = None  # the checkpoint, as the export's child process holds it between modules


def _export_in_child(checkpoint: Path, name: str, out_dir: Path, opts: ExportOptions) -> list[str]:
    """`_export_one` in the child process: the checkpoint is loaded on its first module, and the seed
    set as the parent sets it, so the files equal those of an export in one process."""
    global _child_model
    if _child_model is None:
        import torch

        from sleigh.sleighvl.checkpoint import load_checkpoint

        _child_model = load_checkpoint(checkpoint)[0]
        torch.manual_seed(SEED)
    return _export_one(_child_model, name, out_dir, opts)


@contextmanager
def _module_writer(model, checkpoint: Path, out_dir: Path, opts: ExportOptions, isolate: bool):
    """A function module name -> files written: in this process, or, with `isolate`, in one child
    process (spawned: a fork would share torch's state) that exits, and frees all it held, at the end."""
    if not isolate:
        yield lambda name: _export_one(model, name, out_dir, opts)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    def write(name: str) -> list[str]:
        try:
            return pool.submit(_export_in_child, checkpoint, name, out_dir, opts).result()
        except BrokenProcessPool as e:
            raise SleighError(f"export {name}", "the export's child process died (killed, out of memory?)",
                              "a machine with the memory the export of this checkpoint needs") from e

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield write


def failed_dir(out: Path) -> Path:
    """Where an export that failed its parity check is left: beside the output, visible."""
    return out.with_name(f"{out.name}.parity-failed")


def _keep_failed(tmp: Path, out: Path) -> Path:
    """Move a staging folder that failed parity to `failed_dir(out)`, replacing an earlier failed export."""
    failed = failed_dir(out)
    if failed.is_dir() and (failed / "parity_report.json").is_file() and not (failed / MANIFEST).exists():
        shutil.rmtree(failed)
    if failed.exists():  # not ours: leave it, keep the failure under a name of its own
        failed = failed.with_name(f"{failed.name}-{tmp.name.rsplit('-', 1)[-1]}")
    tmp.replace(failed)
    return failed


def export_package(checkpoint: Path, out: Path, opts: ExportOptions) -> ExportResult:
    from sleigh import staging

    check_options(opts)
    t0 = time.perf_counter()
    checkpoint, out = Path(checkpoint), Path(out)
    staging.check_apart(out, {"checkpoint": checkpoint})
    staging.clean_stale(out.resolve().parent, out.name)  # what killed exports to this output left behind
    staging.prepare_output_dir(out, opts.force)  # before torch is imported or the checkpoint loaded: a refusal costs nothing

    import torch

    from sleigh.export.modules import MODULES
    from sleigh.export.parity import summarize, verify_package
    from sleigh.sleighvl.checkpoint import load_checkpoint

    model, cfg, _ = load_checkpoint(checkpoint)
    source = source_of(checkpoint)  # the weights just read
    if not (checkpoint / TOKENIZER).is_file():
        raise SleighError(str(checkpoint), "no tokenizer.json", "a Sleigh checkpoint with its tokenizer")
    # what the runtime reads of the checkpoint, checked here, where the message can name the checkpoint's
    # files: found in the finished package, it named the staging folder after the whole export
    Contract.of_checkpoint(checkpoint)
    PromptTokenizer.from_file(checkpoint / TOKENIZER)
    parity_image = opts.parity_image or shipped_photo()
    torch.manual_seed(SEED)
    written: dict[str, list[str]] = {}
    tmp = staging.make(out.resolve().parent, out.name)
    try:
        with progress("export", len(MODULES) + (3 if opts.verify else 0), opts.quiet) as bar:
            isolate = opts.isolate if opts.isolate is not None else _weight_bytes(model) > ISOLATE_BYTES
            with _module_writer(model, checkpoint, tmp, opts, isolate) as write:
                for name in MODULES:
                    bar.advance(0, description=f"export {name}")
                    written[name] = write(name)
                    bar.advance()
            shutil.copyfile(checkpoint / TOKENIZER, tmp / TOKENIZER)
            parity = None
            results = []
            if opts.verify:
                bar.advance(0, description="parity")
                results = verify_package(tmp, model, parity_image, progress=bar, kv_form=DECODER_FORMS[opts.decoder],
                                         release=lambda: _free_weights(model))
                parity = {"precision": "fp32", "backend": "onnxruntime CPUExecutionProvider", "image": parity_image.name,
                          **summarize(results)}
                if not parity["passed"]:
                    write_json_atomic(tmp / "parity_report.json", parity)
                    failed = _keep_failed(tmp, out)
                    bad = [f"{r.case}/{r.output} (needs atol {r.needed_atol:.1e} > {r.atol:.0e})" for r in results if not r.ok]
                    raise SleighError(f"export {out}", f"parity failed for {len(bad)} outputs: {', '.join(bad[:4])}",
                                      f"ONNX Runtime to match PyTorch within the fp32 table; {out} is left as it was "
                                      f"and the failed export, with its parity_report.json, is in {failed}")
        manifest = build_manifest(tmp, cfg, opts, written, parity, source)
        ordinary_modes(tmp)  # the staging folder is private and onnx writes external data 0600: a package is not
        write_manifest(tmp, manifest)  # last: only a verified package has a manifest
        staging.install(tmp, out.resolve())  # the previous package, if any, goes only now (a link to it stays)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(out, manifest, results, time.perf_counter() - t0)
