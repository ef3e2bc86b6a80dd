"""Run the labs' commands as a student would and measure what the handouts say they will see.

    python labs/measure.py                      # every lab, seeds 0 and 1 (about 100 minutes on 2 CPU cores)
    python labs/measure.py --labs 1,3 --seeds 0,1,2

Each handout (labs/lab*.md) holds its commands in ```bash blocks, written with $SEED, and a
<!-- measure ... --> block: one line per number, `label | file | key [| column=value]`, the file
under runs/ with $SEED in its path (.jsonl: the key of its last line that has it; .csv: the column
`key` of its last row, or of the row where `column` equals `value`). For every seed this script
runs the commands from the repository's root, then prints per lab the wall-clock time and a
Markdown table of each number's mean and range over the seeds, to be pasted into the handout.
tests/test_labs.py runs the same commands at a tiny size, so that a renamed flag or a missing
output file breaks the test suite instead of a lab.
"""
import argparse
import csv
import datetime
import glob
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABS = os.path.join(ROOT, "labs")


def handouts():
    return sorted(glob.glob(os.path.join(LABS, "lab[0-9]*.md")))


def commands(text):
    """The shell commands of a handout's ```bash blocks, one per line (backslash continuations
    joined, comments and blank lines dropped)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip() if not line.lstrip().startswith("#") else ""
            if line:
                out.append(line)
    return out


def measures(text):
    """[(label, file, key, where or None)] from the handout's <!-- measure ... --> block."""
    block = re.search(r"<!-- measure\n(.*?)-->", text, flags=re.S)
    rows = []
    for line in (block.group(1).strip().splitlines() if block else []):
        parts = [p.strip() for p in line.split("|")]
        rows.append((parts[0], parts[1], parts[2], parts[3] if len(parts) > 3 else None))
    return rows


def read_number(path, key, where=None):
    """The number `key` in a run's output file (see the module docstring); None when absent."""
    if not os.path.exists(path):
        return None
    if path.endswith(".jsonl"):
        rows = [json.loads(line) for line in open(path) if line.strip()]
    else:
        rows = list(csv.DictReader(open(path, newline="")))
    if where:
        col, val = where.split("=", 1)
        rows = [r for r in rows if str(r.get(col)) == val]
    vals = [r[key] for r in rows if r.get(key) not in (None, "")]
    return float(vals[-1]) if vals else None


def run_lab(path, seed, extra=lambda argv: argv, env=None):
    """Every command of one handout for one seed, from the repository root; the seconds it took."""
    t0 = time.time()
    for line in commands(open(path).read()):
        line = line.replace("$SEED", str(seed))
        if line.startswith("SEED="):
            continue
        argv = shlex.split(line)
        if argv[0] in ("python", "python3"):
            argv = [sys.executable] + extra(argv[1:])
        print(f"$ {' '.join(argv)}", flush=True)
        res = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
        if res.returncode:
            raise SystemExit(f"{os.path.basename(path)}: `{line}` failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    return time.time() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labs", default=None, help="comma-separated lab numbers (default: all)")
    p.add_argument("--seeds", default="0,1")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    for path in handouts():
        number = re.match(r"lab(\d+)", os.path.basename(path)).group(1)
        if args.labs and number not in args.labs.split(","):
            continue
        seconds = [run_lab(path, seed) for seed in seeds]
        print(f"\n### {os.path.basename(path)}: measured {datetime.date.today().isoformat()}, {platform.machine()} "
              f"with {os.cpu_count()} CPU cores, seeds {args.seeds}; machine time per seed "
              f"{min(seconds) / 60:.0f}-{max(seconds) / 60:.0f} min\n")
        print("| what | mean | range over the seeds |\n| --- | --- | --- |")
        for label, file, key, where in measures(open(path).read()):
            vals = [read_number(os.path.join(ROOT, file.replace("$SEED", str(s))), key, where) for s in seeds]
            if any(v is None for v in vals):
                print(f"| {label} | missing: {file} {key} | |")
                continue
            print(f"| {label} | {sum(vals) / len(vals):.3g} | {min(vals):.3g} to {max(vals):.3g} |")


if __name__ == "__main__":
    main()
