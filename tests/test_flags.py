"""Every numeric flag of every script carries its range in the parser (data.Number), so a value outside
it stops argparse with exit code 2 and one line naming the flag, before any work starts. The test walks
the parsers themselves instead of listing cases: a new numeric flag without a range fails it, and so does
a range that lets nan, inf or a bound through. The flag table of docs/troubleshooting.md is checked against the
same walk.

    python tests/test_flags.py          # prints that table, from the parsers
"""
import argparse
import importlib
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT

import data

SCRIPTS = ("pretrain", "finetune", "linprobe", "curriculum", "cam", "segment", "sweep", "bench")
# the fewest arguments with which each parser parses: required flags, and segment's two modes
BASE = {"cam": [["--checkpoint", "x.pt"]], "segment": [["train", "--data-dir", "d", "--masks", "m"],
                                                       ["predict", "--data-dir", "d", "--checkpoint", "c.pt"]]}


class Caught(Exception):
    """Carries the parser get_args built, stopped as it was about to parse."""


def parsers(script):
    """(argv that parses, the parser that argv ends in) for every parser of a script: segment's train
    and predict subparsers, the main parser of the others."""
    mod = importlib.import_module(script)
    real = argparse.ArgumentParser.parse_args

    def catch(self, *a, **k):
        raise Caught(self)
    out = []
    for base in BASE.get(script, [[]]):
        argparse.ArgumentParser.parse_args = catch
        try:
            mod.get_args(list(base))
        except Caught as c:
            p = c.args[0]
        finally:
            argparse.ArgumentParser.parse_args = real
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        out.append((base, subs[0].choices[base[0]] if subs else p))
    return mod, out


def numeric_actions(parser):
    """The flags that take a number: a data.Number type, or a bare int / float type or numeric default
    (the mistakes this test is for)."""
    for a in parser._actions:
        if not a.option_strings or a.nargs == 0 or a.help == argparse.SUPPRESS:
            continue
        if isinstance(a.type, data.Number) or a.type in (int, float) or \
                (a.type is None and isinstance(a.default, (int, float)) and not isinstance(a.default, bool)):
            yield a


def outside(num, text):
    """Whether text is outside num's range, decided here and not by data.Number itself."""
    vals = text.split(",") if num.items else [text]
    try:
        v = [int(t) if num.kind is int else float(t) for t in vals]
    except ValueError:
        return True
    ok = all(math.isfinite(x) and (x > num.lo if num.lo_open else x >= num.lo) and
             (x < num.hi if num.hi_open else x <= num.hi) and (not num.multiple or x % num.multiple == 0) for x in v)
    if num.count and len(v) != num.count or num.total is not None and abs(sum(v) - num.total) > 1e-6:
        ok = False
    return not ok


def candidates(num):
    """Values worth trying: the specials, the bounds and their neighbours, a fraction, not a number."""
    c = ["nan", "inf", "-inf", "0", "-1", "1.5", "1e400", "abc", ""]
    for b in (num.lo, num.hi):
        if math.isfinite(b):
            c += [f"{b:g}", f"{b - 1:g}", f"{b + 1:g}", f"{b - 0.5:g}", f"{b + 0.5:g}"]
    if num.multiple:
        c.append(str(num.multiple + 1))
    if num.items:
        c += ["1,nan", "0.5,0.5", ",", "0.2,0.2,0.6", "0.5,0.5,0.5"]
    return c


WALK = [(s, *p) for s in SCRIPTS for p in parsers(s)[1]]


@pytest.mark.parametrize("script,base,parser", WALK, ids=[f"{s}{' ' + b[0] if s == 'segment' else ''}"
                                                         for s, b, _ in WALK])
def test_every_numeric_flag_refuses_what_is_outside_its_range(script, base, parser, capsys):
    mod = importlib.import_module(script)
    actions = list(numeric_actions(parser))
    assert actions, f"{script}: no numeric flags found: the walk is broken"
    for a in actions:
        flag = a.option_strings[-1]
        assert isinstance(a.type, data.Number) or a.choices, \
            f"{script} {flag}: a numeric flag without a range; give it type=data.Number(...) (or choices)"
        if a.choices:                                   # --channels 1|3: argparse checks the choices
            continue
        num = a.type
        if isinstance(a.default, (int, float)):
            assert not outside(num, repr(a.default)), f"{script} {flag}: default {a.default} outside {num.range}"
        help_text = " ".join(parser._get_formatter()._format_action(a).split())
        assert num.range in help_text, f"{script} {flag}: --help does not show the range: {help_text}"
        tried = 0
        for value in candidates(num):
            if not outside(num, value):
                assert num(value) is not None           # inside: the type takes it
                continue
            tried += 1
            with pytest.raises(SystemExit) as stop:
                mod.get_args(base + [f"{flag}={value}"])
            err = capsys.readouterr().err
            assert stop.value.code == 2, f"{script} {flag} {value!r}: exit {stop.value.code}"
            assert flag in err and "Traceback" not in err and err.strip().count("\n") == 0, err
        assert tried >= 6, f"{script} {flag}: only {tried} values outside {num.range} tried"


def test_the_range_type_itself():
    """Bounds open and closed, integers, lists with a count and a total, the words of the error."""
    lam, n = data.Number(float, "[0, 1]"), data.Number(int, "(0, 10]", multiple=2)
    assert lam("0") == 0 and lam("1") == 1 and n("10") == 10 and isinstance(n("4"), int)
    for bad, num in (("1.0001", lam), ("-0.0001", lam), ("nan", lam), ("0", n), ("3", n), ("12", n), ("4.0", n)):
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(f"{bad} is not {num.range}")):
            num(bad)
    frac = data.Number(float, "[0, 1]", items=True, count=3, total=1, text=True)
    assert frac("0.7, 0.1,0.2") == "0.7, 0.1,0.2" and data.Number(int, "[1, 5]", items=True)("1,5") == [1, 5]
    for bad in ("0.5,0.5", "0.7,0.1,0.3", "1.2,-0.1,-0.1", "0.7,0.1,"):
        with pytest.raises(argparse.ArgumentTypeError):
            frac(bad)
    assert lam.range == "a number in [0, 1]" and n.range == "an integer in (0, 10], a multiple of 2"
    assert data.POS_INT.range == "an integer >= 1" and data.POS.range == "a number > 0"


def flag_table():
    """docs/troubleshooting.md's table: one row per flag and range, with the scripts that take it."""
    rows = {}
    for s, base, p in WALK:
        name = f"segment {base[0]}" if s == "segment" else s
        for a in numeric_actions(p):
            rng = a.type.range if isinstance(a.type, data.Number) else "one of " + ", ".join(map(str, a.choices))
            rows.setdefault((a.option_strings[-1], rng), []).append(name)
    lines = ["| flag | accepts | scripts |", "| --- | --- | --- |"]
    for (flag, rng), scripts in sorted(rows.items()):
        lines.append(f"| `{flag}` | {rng} | {', '.join(dict.fromkeys(scripts))} |")
    return "\n".join(lines)


def test_docs_list_every_flag_and_its_range():
    doc = open(os.path.join(ROOT, "docs", "troubleshooting.md")).read()
    table = re.search(r"<!-- flags: python tests/test_flags.py -->\n(.*?)\n<!-- /flags -->", doc, re.S)
    assert table, "docs/troubleshooting.md: no flag table between <!-- flags: python tests/test_flags.py --> and " \
                  "<!-- /flags -->"
    assert table.group(1) == flag_table(), "docs/troubleshooting.md's flag table is stale: paste " \
                                           "`python tests/test_flags.py`"


def test_the_four_commands_of_issue_20_stop_with_one_line(tmp_path):
    """As a user types them, in a fresh process: one line naming the flag or the file, exit non-zero,
    and nothing written."""
    x = np.random.default_rng(0).integers(0, 256, (40, 16, 16, 3)).astype(np.uint8)
    y = np.arange(40) % 4
    y[13] = -1
    np.savez(tmp_path / "x.npz", x=x, y=y)
    for argv, named in ((["pretrain.py", "--lam", "2"], "argument --lam: 2 is not a number in [0, 1]"),
                        (["pretrain.py", "--batch-size", "0"], "argument --batch-size: 0 is not an integer >= 1"),
                        (["linprobe.py", "--dataset", "npz", "--data-dir", str(tmp_path / "x.npz"), "--device", "cpu"],
                         f"{tmp_path / 'x.npz'}: y: label -1 at index 13 is outside 0..3"),
                        (["pretrain.py", "--noise-ratio", "1.5"],
                         "argument --noise-ratio: 1.5 is not a number in (0, 1]")):
        res = subprocess.run([sys.executable, *argv, "--output-dir", str(tmp_path / "out")], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        said = (res.stdout + res.stderr).strip()
        assert res.returncode != 0 and named in said and said.count("\n") == 0, said
    assert not os.path.exists(tmp_path / "out")


if __name__ == "__main__":
    print(flag_table())


@pytest.mark.parametrize("argv", [["pretrain"], ["finetune"], ["linprobe"], ["curriculum"], ["cam"], ["segment"],
                                  ["segment", "train"], ["segment", "predict"], ["bench"], ["sweep"], ["data", "download"]])
def test_every_help_prints(argv, capsys, monkeypatch):
    """--help of every script and mode: exit 0, each flag's range and default shown, no traceback."""
    import runpy
    monkeypatch.setattr(sys, "argv", [argv[0] + ".py", *argv[1:], "--help"])
    with pytest.raises(SystemExit) as stop:
        if argv[0] == "data":                          # its command line lives under __main__
            runpy.run_path(os.path.join(ROOT, "data.py"), run_name="__main__")
        else:
            importlib.import_module(argv[0]).get_args(argv[1:] + ["--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0 and out.startswith("usage:"), out
    assert "(default:" in out or argv == ["segment"]
