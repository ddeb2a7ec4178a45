"""`sleigh inspect`: what a package holds, read from its manifest and its ONNX graphs."""

from __future__ import annotations

from pathlib import Path

from sleigh.runtime.package import read_manifest, verify_files


def inspect_package(pkg: Path, verify: bool = False) -> dict:
    from sleigh.export.exporter import describe_io

    pkg = Path(pkg)
    manifest = read_manifest(pkg)
    modules = {}
    for name, entry in manifest["modules"].items():
        path = pkg / entry["file"]
        io = {"inputs": [], "outputs": [], "opset": {}, "custom_ops": [], "nodes": 0}
        if not path.is_file():
            io["error"] = "file missing"
        else:
            try:
                io = describe_io(path)
            except Exception as e:  # a damaged file: report it, keep inspecting the rest
                io["error"] = f"unreadable ({type(e).__name__})"
        size = sum((pkg / f).stat().st_size for f in [entry["file"], *entry.get("data_files", [])] if (pkg / f).is_file())
        modules[name] = {"file": entry["file"], "bytes": size, "precision": entry.get("precision", "fp32"), **io}
    report = {
        "package": str(pkg),
        "created_by": manifest.get("created_by"),
        "opset": manifest.get("opset"),
        "gswa": manifest.get("gswa"),
        "parity_passed": (manifest.get("parity") or {}).get("passed"),
        "modules": modules,
        "engines": {name: {k: e.get(k) for k in ("backend", "precision", "llm_weights", "files_bytes", "accuracy_passed")}
                    for name, e in manifest.get("engines", {}).items()},
    }
    if verify:
        report["verify"] = {"problems": verify_files(pkg, manifest), "files": len(manifest.get("files", {}))}
    return report


def _shape(s: list) -> str:
    return "[" + ", ".join(str(d) for d in s) + "]"


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(120, Console().width))
    cb = report.get("created_by") or {}
    console.print(f"[bold]{report['package']}[/]  opset {report['opset']}  sleigh {cb.get('sleigh')}  "
                  f"torch {cb.get('torch')}  onnx {cb.get('onnx')}  parity {'passed' if report['parity_passed'] else 'not checked' if report['parity_passed'] is None else 'FAILED'}")
    table = Table(show_lines=True)
    for h in ("module", "file", "MB", "precision", "inputs", "outputs", "custom ops"):
        table.add_column(h)
    for name, m in report["modules"].items():
        ins = "\n".join(f"{i['name']} {i['dtype']} {_shape(i['shape'])}" for i in m["inputs"][:6])
        if len(m["inputs"]) > 6:
            ins += f"\n... +{len(m['inputs']) - 6} more"
        outs = "\n".join(f"{o['name']} {o['dtype']} {_shape(o['shape'])}" for o in m["outputs"][:4])
        if len(m["outputs"]) > 4:
            outs += f"\n... +{len(m['outputs']) - 4} more"
        custom = "\n".join(f"{c['domain']}::{c['op_type']} ({'with' if c['function'] else 'NO'} function) "
                           + ", ".join(f"{k}={v}" for k, v in c["attributes"].items()) for c in m["custom_ops"]) or "-"
        if m.get("error"):
            ins = outs = m["error"]
        table.add_row(name, m["file"], f"{m['bytes'] / 1e6:.1f}", m["precision"], ins, outs, custom)
    console.print(table)
    if report["engines"]:
        et = Table(title="engines")
        for h in ("name", "backend", "precision", "LLM weights", "MB", "accuracy"):
            et.add_column(h)
        for name, e in report["engines"].items():
            et.add_row(name, str(e["backend"]), str(e["precision"]), str(e.get("llm_weights") or "-"),
                       f"{(e.get('files_bytes') or 0) / 1e6:.1f}", {True: "passed", False: "FAILED", None: "-"}[e.get("accuracy_passed")])
        console.print(et)
    else:
        console.print("engines: none (sleigh build-engine adds them)")
    if "verify" in report:
        probs = report["verify"]["problems"]
        console.print(f"verify: {report['verify']['files']} files, " + ("all match the manifest" if not probs else f"{len(probs)} differ"))
        for p in probs:
            console.print(f"  {p}")
