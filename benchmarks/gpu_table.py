"""One table from `sleigh bench --json` reports and benchmarks/hf_anchor.py rows (scripts/gpu_check.sh).

    python benchmarks/gpu_table.py --device "NVIDIA H200" bench.json anchor.json [more.json ...]

`LABEL=` names the rows of a file. Each file holds either a bench report ({"rows": [...], ...}) or one row; `REPORT.json@MEM.log` also
sets the rows' GPU memory to the peak of an `nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms N`
log taken while that report ran (the whole process's memory, the arena included). Rows keep their order;
missing values print as "-". The bandwidth floor column is decode tokens/s as a share of
`--floor-tokens-per-s` when given (issue 9: ~1,230 tokens/s for fp16 weights at 4.2 TB/s).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# "ran as": the backend as the report describes it (engine, provider, where the decoder ran, CUDA graph):
# a row's label says what was asked for, this what ran
COLUMNS = [("target", "target"), ("backend", "ran as"), ("views", "views"), ("prompt_tokens", "prompt tokens"),
           ("vision_ms_per_view", "vision ms/view"), ("prefill_ms", "prefill ms"),
           ("time_to_first_token_ms", "first token ms"), ("decode_tokens_per_s", "decode tokens/s"),
           ("gpu_memory_gb", "GPU memory GB")]


def rows_of(data: dict) -> list[dict]:
    return list(data["rows"]) if "rows" in data else [data]


def last_json(text: str) -> dict | None:
    """The last line of a step's output that is a report (a JSON object with "rows", or one row with a
    "target"; progress and warnings come before it), or None: the step failed, its error is last."""
    for line in reversed(text.splitlines()):
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if isinstance(data, dict) and ("rows" in data or "target" in data):
            return data
    return None


def peak_gb(mem_log: str) -> float | None:
    """Peak of an nvidia-smi memory.used log in MiB per line -> GB."""
    values = [float(v) for v in mem_log.split() if v.replace(".", "", 1).isdigit()]
    return round(max(values) * 2**20 / 1e9, 2) if values else None


def table(rows: list[dict], device: str, floor: float | None = None) -> str:
    cols = COLUMNS + ([("floor_share", "% of floor")] if floor else [])
    lines = [f"Device: {device}", "", "| " + " | ".join(title for _, title in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        r = dict(r)
        if floor and r.get("decode_tokens_per_s") is not None:
            r["floor_share"] = round(100 * r["decode_tokens_per_s"] / floor, 1)
        lines.append("| " + " | ".join("-" if r.get(key) is None else str(r[key]) for key, _ in cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", help="[LABEL=]REPORT.json[@NVIDIA_SMI_MEMORY.log]")
    p.add_argument("--device", required=True, help="the machine, named in the table (RESULTS.md names the device)")
    p.add_argument("--floor-tokens-per-s", type=float, default=None)
    a = p.parse_args(argv)
    rows = []
    for arg in a.files:
        label, _, rest = str(arg).rpartition("=")  # "LABEL=REPORT.json@MEM.log": the rows' target is LABEL
        report, _, mem = rest.partition("@")
        text = Path(report).read_text().strip() if Path(report).is_file() else ""
        if not text:
            rows.append({"target": f"{label or Path(report).name}: missing or empty (the step failed, ran out of time "
                                   "or was not run)"})
            continue
        data = last_json(text)
        if data is None:  # a failed step: its log ends in the error
            rows.append({"target": f"{label or Path(report).name}: failed ({text.splitlines()[-1][:160]})"})
            continue
        new = rows_of(data)
        if mem and Path(mem).is_file():
            for r in new:
                r["gpu_memory_gb"] = peak_gb(Path(mem).read_text())
        if label:
            for r in new:
                r["target"] = label
        rows += new
    print(table(rows, a.device, a.floor_tokens_per_s))


if __name__ == "__main__":
    main()
