"""Peak RSS of export's parity on an exported package, with the torch weights released before the
decoder's session opens (as `sleigh export` does), printed at each point. The package's decoder must
be the fused form (the default).

    PYTHONPATH=. python benchmarks/parity_memory.py CKPT PKG
"""
import sys
import time
from pathlib import Path

from sleigh.export.exporter import _free_weights
from sleigh.export.parity import verify_package
from sleigh.runtime.package import shipped_photo
from sleigh.sleighvl.checkpoint import load_checkpoint


def mem():
    f = dict(l.split(":", 1) for l in open("/proc/self/status"))
    return f"RSS {int(f['VmRSS'].split()[0]) / 1e6:.2f} GB, peak {int(f['VmHWM'].split()[0]) / 1e6:.2f} GB"


t = time.perf_counter()
model, cfg, _ = load_checkpoint(Path(sys.argv[1]))
print(f"loaded {time.perf_counter() - t:.0f} s: {mem()}", flush=True)


def release():
    print(f"decoder references done {time.perf_counter() - t:.0f} s: {mem()}", flush=True)
    _free_weights(model)
    print(f"weights released: {mem()}", flush=True)


res = verify_package(Path(sys.argv[2]), model, shipped_photo(), kv_form="shared", release=release)
print(f"parity {'passed' if all(r.ok for r in res) else 'FAILED'} ({len(res)} comparisons) in {time.perf_counter() - t:.0f} s: {mem()}")
