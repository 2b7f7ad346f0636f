"""The command line: every command and every bench answers ``--help`` with its own usage and flags,
and parsing them stays light (no bench module, gensim, torch or Ray loaded)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from embedjob.cli import BENCHES as CLI_BENCHES
from embedjob.cli import main

ROOT = Path(__file__).resolve().parent.parent


COMMANDS = ["run", "config", "similar", "search", "topics", "report", "bench"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_answers_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: embedjob " + command), out[:200]


BENCHES = ["encode", "static", "word2vec", "topics", "index", "vectors", "windows", "dedup", "feed", "faults", "reuse"]


@pytest.mark.parametrize("bench", BENCHES)
def test_every_bench_answers_help(bench, capsys):
    """`embedjob bench NAME --help` lists the bench's own flags."""
    assert sorted(CLI_BENCHES) == sorted(BENCHES)
    with pytest.raises(SystemExit) as exit_:
        main(["bench", bench, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: embedjob bench " + bench), out[:200]
    assert "--json" in out


def test_cli_imports_no_bench_module_nor_heavy_library():
    """Parsing ``embedjob bench NAME --help`` loads neither the bench modules (their flags only,
    ``bench/flags.py``) nor gensim, torch or Ray."""
    code = ("import sys\nfrom embedjob.cli import build_parser\n"
            f"for b in {BENCHES!r}:\n"
            "    try:\n        build_parser().parse_args(['bench', b, '--help'])\n    except SystemExit:\n        pass\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('gensim', 'torch', 'ray')"
            " or (m.startswith('embedjob.bench') and m not in ('embedjob.bench', 'embedjob.bench.flags')))\n"
            "print('HEAVY', heavy)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "HEAVY []" in res.stdout, res.stdout[-2000:]
