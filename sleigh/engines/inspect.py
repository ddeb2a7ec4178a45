"""`sleigh inspect`: what a package holds, read from its manifest and its ONNX graphs."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from sleigh.errors import SleighError
from sleigh.runtime.manifest import read_manifest
from sleigh.runtime.package import verify_files


def inspect_package(pkg: Path, verify: bool = False) -> dict:
    from sleigh.onnx_files import describe_io
    from sleigh.runtime.backends import missing_files

    pkg = Path(pkg)
    manifest = read_manifest(pkg)
    modules = {}
    for name, entry in manifest.modules.items():
        path = manifest.path(entry.file, f"manifest.json: modules.{name}.file")
        io = {"inputs": [], "outputs": [], "opset": {}, "custom_ops": [], "onnxruntime_ops": {}, "nodes": 0}
        if not path.is_file():
            io["error"] = "file missing"
        else:
            try:
                io = describe_io(path)
            except ImportError:
                raise SleighError("sleigh inspect", "needs the onnx package to read graphs",
                                  "pip install 'sleigh[export]'") from None
            except Exception as e:  # a damaged file: report it, keep inspecting the rest
                io["error"] = f"unreadable ({type(e).__name__})"
        present = [p for p in (manifest.path(f) for f in [entry.file, *entry.data_files]) if p.is_file()]
        size = sum(p.stat().st_size for p in present)
        modules[name] = {"file": entry.file, "bytes": size, "precision": entry.precision, **io}
    report = {
        "package": str(pkg),
        "created_by": manifest.created_by,
        "source": manifest.source,
        "opset": manifest.opset,
        "gswa": None if manifest.contract.gswa is None else asdict(manifest.contract.gswa),
        "kv_cache": {"form": manifest.contract.kv_cache.form, "past": list(manifest.contract.kv_cache.past),
                     "new": list(manifest.contract.kv_cache.new)},
        "parity_passed": (manifest.parity or {}).get("passed"),
        "calibration": None if (c := manifest.calibration) is None else {
            "method": c.method, "num_images": c.num_images, "skipped": c.skipped, "views": c.views, "max_tiles": c.max_tiles},
        "modules": modules,
        "engines": {name: {**{k: getattr(e, k) for k in ("backend", "precision", "llm_weights", "kv_dtype", "files_bytes",
                                                          "accuracy_passed", "degraded")},
                           "built_for": e.record.get("shapes"), "max_memory": e.max_memory,  # what a run may give it
                           "build_record": e.record,  # the rest of what the build wrote (--json only)
                           "missing_files": missing_files(pkg, manifest, name)}
                    for name, e in manifest.engines.items()},
    }
    report["stale_staging"] = stale_staging(pkg)
    if verify:
        report["verify"] = {"problems": verify_files(pkg, manifest), "files": len(manifest.files)}
    return report


def stale_staging(pkg: Path) -> list[str]:
    """Staging folders that killed exports of this package or builds of its engines left behind."""
    from sleigh import staging

    pkg = Path(pkg).resolve()
    return [str(p) for p in staging.stale(pkg.parent, pkg.name) + staging.stale(pkg / "engines")]


def _shape(s: list) -> str:
    return "[" + ", ".join(str(d) for d in s) + "]"


def _built_for(engine: dict) -> str:
    """The shapes an engine was built for, and its memory budget: `13 views, 4,096 tokens, 2.5G`."""
    from sleigh.runtime.memory import size_text

    shapes = engine.get("built_for") or {}
    parts = [f"{shapes['max_views']} views" if shapes.get("max_views") else "",
             f"{shapes['max_context']:,} tokens" if shapes.get("max_context") else "",
             size_text(engine["max_memory"]) if engine.get("max_memory") else ""]  # as --max-memory reads it, and the rebuild command shows it
    return ", ".join(p for p in parts if p) or "-"


def print_report(report: dict) -> None:
    from rich.table import Table
    from rich.text import Text

    from sleigh.progress import table_console

    console = table_console(140)  # no markup: names and paths are shown as they are
    cb = report.get("created_by") or {}
    console.print(Text(str(report['package']), style="bold"), f" opset {report['opset']}  sleigh {cb.get('sleigh')}  "
                  f"torch {cb.get('torch')}  onnx {cb.get('onnx')}  parity {'passed' if report['parity_passed'] else 'not checked' if report['parity_passed'] is None else 'FAILED'}")
    src = report.get("source")
    if src:
        trained = src.get("trained")
        run = f", trained {trained.get('steps')} steps on {trained.get('data')}" if isinstance(trained, dict) else ""
        console.print(f"from {src.get('checkpoint')} (weights sha256 {str(src.get('weights_sha256'))[:12]}){run}")
    for name, m in report["modules"].items():
        custom = "; ".join(f"{c['domain']}::{c['op_type']} ({'with' if c['function'] else 'NO'} local function; "
                           + ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in c["attributes"].items()) + ")"
                           for c in m["custom_ops"]) or "none"
        console.print(Text(name, style="bold"), f" {m['file']}  {m['bytes'] / 1e6:.1f} MB  {m['precision']}  "
                      f"opset {m.get('opset', {}).get('ai.onnx', '?')}  {m.get('nodes', 0)} nodes  custom ops: {custom}"
                      + "".join(f"  {op} x{n}" for op, n in m.get("onnxruntime_ops", {}).items()))
        if m.get("error"):
            console.print(Text(f"  {m['error']}", style="red"))
            continue
        table = Table(show_header=True, box=None, padding=(0, 2))
        for h in ("", "name", "dtype", "shape"):
            table.add_column(h)
        for kind, items, side in (("in", m["inputs"], "past"), ("out", m["outputs"], "new")):
            kv = set(report["kv_cache"][side])  # the decoder's cache tensors: one row for all
            folded = [i for i in items if i["name"] in kv]
            for i in items:
                if i["name"] not in kv:
                    table.add_row(kind, i["name"], i["dtype"], _shape(i["shape"]))
            if folded:
                first = folded[0]
                table.add_row(kind, f"kv_cache.{side} ({len(folded)} tensors, {first['name']} .., form {report['kv_cache']['form']})",
                              first["dtype"], _shape(first["shape"]))
        console.print(table)
    if c := report.get("calibration"):
        console.print(f"calibration: {c['method']} on {c['num_images']} images ({c['skipped']} skipped), "
                      f"{c['views']} views, up to {c['max_tiles']} tiles each (sleigh calibrate)")
    if report["engines"]:
        et = Table(title="engines")
        for h in ("name", "backend", "precision", "LLM weights", "KV slots", "built for", "MB", "accuracy", "files"):
            et.add_column(h)
        for name, e in report["engines"].items():
            accuracy = {True: "passed", False: "FAILED", None: "-"}[e.get("accuracy_passed")]
            missing = e.get("missing_files") or []
            et.add_row(name, str(e["backend"]), str(e["precision"]), str(e.get("llm_weights") or "-"),
                       str(e.get("kv_dtype") or "-"), _built_for(e),
                       f"{(e.get('files_bytes') or 0) / 1e6:.1f}", accuracy + (" (degraded, kept)" if e.get("degraded") else ""),
                       Text(f"MISSING {len(missing)} (rebuild)", style="red") if missing else "present")
        console.print(et)
    else:
        console.print("engines: none (sleigh build-engine adds them)")
    if report.get("stale_staging"):
        console.print(f"stale staging folders, left by killed exports or builds (the next export or build-engine "
                      f"removes them): {', '.join(report['stale_staging'])}", markup=False)
    if "verify" in report:
        probs = report["verify"]["problems"]
        console.print(f"verify: {report['verify']['files']} files, " + ("all match the manifest" if not probs else f"{len(probs)} differ"))
        for p in probs:
            console.print(f"  {p}")
