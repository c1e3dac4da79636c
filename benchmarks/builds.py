"""Pure-Python against compiled (mypyc) edge-broker, interleaved, mosquitto as the reference.

    python -m benchmarks.builds --compiled-python /tmp/eb-compiled/bin/python \\
        --scenarios S1,S2,S3 --duration 5 --repeat 3

It runs the runner (`python -m benchmarks --brokers edge,mosquitto`) `--repeat` times for
each build, alternating pure, compiled, pure, ...: edge-broker from this checkout (pure
Python, the runner's default command) and edge-broker as installed in the venv of
`--compiled-python` (a compiled wheel, see docs/compiled.md; PYTHONPATH is unset for it, so
the checkout does not shadow the installed package). Every invocation measures mosquitto too,
so each ratio is from one invocation. It prints, per figure, the median over the invocations
of each build's absolute figure and of its ratio to mosquitto, and writes every invocation's
figures to `--json` (default results/builds.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
COMPILED_CMD = "env -u PYTHONPATH {venv_python} -m edge_broker run --config {{config}}"
PROBE = ("import edge_broker.buildinfo as b; m = b.modules(); "
         "print(sum(m.values()), len(m), b.build_status())")


def run_once(edge_cmd: str | None, args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, "-m", "benchmarks", "--brokers", "edge,mosquitto",
           "--scenarios", args.scenarios, "--duration", str(args.duration), "--no-ceiling",
           "--json", str(out), "--markdown", str(out.with_suffix(".md"))]
    if edge_cmd:
        cmd += ["--edge-cmd", edge_cmd]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=HERE.parent, check=True)
    figures: dict = json.loads(out.read_text())["figures"]
    return figures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compiled-python", required=True,
                    help="python of a venv with the compiled wheel installed")
    ap.add_argument("--scenarios", default="S1,S2,S3")
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path, default=HERE / "results" / "builds.json")
    args = ap.parse_args(argv)

    probe = subprocess.run([args.compiled_python, "-c", PROBE], capture_output=True, text=True,
                           cwd=tempfile.gettempdir(), check=True,
                           env={"PATH": "/usr/local/bin:/usr/bin:/bin"})
    print(f"compiled venv: {probe.stdout.strip()}", flush=True)
    builds = {"pure": None,
              "compiled": COMPILED_CMD.format(venv_python=args.compiled_python)}
    runs: dict[str, list[dict]] = {name: [] for name in builds}
    with tempfile.TemporaryDirectory(prefix="bench-builds-") as tmp:
        for i in range(args.repeat):
            for name, edge_cmd in builds.items():
                runs[name].append(run_once(edge_cmd, args, Path(tmp) / f"{name}-{i}.json"))

    print(f"\nmedian of {args.repeat} interleaved invocations per build "
          "(ratio: edge / mosquitto of the same invocation)")
    metrics = sorted({m for r in runs["pure"] + runs["compiled"] for m in r.get("edge", {})})
    summary: dict[str, dict] = {}
    for metric in metrics:
        row: dict[str, float | None] = {}
        for name in builds:
            values = [r["edge"].get(metric) for r in runs[name]]
            ratios = [r["edge"][metric] / r["mosquitto"][metric] for r in runs[name]
                      if r["edge"].get(metric) and r.get("mosquitto", {}).get(metric)]
            mosq = [r.get("mosquitto", {}).get(metric) for r in runs[name]]
            good = [v for v in values if v is not None]
            row[name] = statistics.median(good) if good else None
            row[f"{name} / mosquitto"] = statistics.median(ratios) if ratios else None
            known = [v for v in mosq if v is not None]
            row[f"mosquitto ({name} runs)"] = statistics.median(known) if known else None
        summary[metric] = row
        print(f"{metric:28s} " + "  ".join(
            f"{k} {v:,.2f}" if v is not None and "/" in k else
            f"{k} {v:,.0f}" if v is not None else f"{k} -" for k, v in row.items()))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"compiled_venv": probe.stdout.strip(), "options": {
        "scenarios": args.scenarios, "duration": args.duration, "repeat": args.repeat},
        "summary": summary, "runs": runs}, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
