"""The documentation stays true: every command shown in README.md and docs/*.md is
run or checked against the code.

The convention (also at the top of docs/cli.md): a fenced block whose previous
non-blank line is ``<!-- runnable -->`` is run, in page order, in one folder per page
(holding a generated ``clip.mp4`` and seeing the real data at ``../shared/data``);
options after the word: ``exit=N`` (expected exit status), ``needs=haxby`` (skipped
without the Haxby runs), ``file=NAME`` (write the block to NAME instead of running
it). Shell blocks run in ``bash -e``; their ``voxelflow`` is a shell function that
hands its arguments, the shell's folder and the variables the block set to this
process, which runs the CLI's entry point ``voxelflow.cli.main(argv)`` (no new
interpreter: ~4 s of imports saved per command; the console script in its own process
is checked by tests/test_packaging.py); the function then prints the command's output
and returns its exit status, so pipes, ``$(...)``, redirections and ``set -e`` work as
with the real program. Python blocks are exec'd in that folder, one namespace per page.
Every other block is
checked statically: ``voxelflow`` command lines parse with the CLI's own argparse
parser, ``toml`` blocks load as experiment files, Python blocks compile and their
``voxelflow`` imports exist, ``make`` targets exist. Plus: every CLI option appears in
docs/cli.md, every relative link and anchor resolves, README.md stays short.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import HAXBY, ROOT, SHARED_DATA, THREAD_VARS, cli_here

DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md")), ROOT / "benchmarks" / "README.md"]
README_MAX_LINES = 200
SHELL_LANGS = {"", "sh", "bash", "shell", "console"}

_FENCE = re.compile(r"^(`{3,}|~{3,})\s*([\w+-]*)\s*$")
_MARKER = re.compile(r"^<!--\s*runnable\b(?P<options>[^>]*?)\s*-->$")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page."""

    page: Path
    line: int               # 1-based line of the opening fence
    lang: str               # the fence's info string ("" for none)
    text: str               # the block's content, ending with a newline
    runnable: bool
    options: tuple[tuple[str, str], ...] = ()

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    def option(self, key: str, default: str | None = None) -> str | None:
        return dict(self.options).get(key, default)


def read_blocks(page: Path) -> list[Block]:
    """The fenced blocks of ``page`` with their ``<!-- runnable ... -->`` marker."""
    lines = page.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang = m.groups()
        end = next((j for j in range(i + 1, len(lines))
                    if lines[j].rstrip() == fence[0] * len(fence)), None)
        assert end is not None, f"{page}:{i + 1}: code fence never closed"
        before = next((lines[k].strip() for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        marker = _MARKER.match(before)
        options = tuple(tuple(opt.split("=", 1)) for opt in
                        (marker.group("options").split() if marker else []))
        assert all(len(o) == 2 for o in options), f"{page}:{i + 1}: marker options are key=value"
        blocks.append(Block(page, i + 1, lang, "\n".join(lines[i + 1:end]) + "\n",
                            marker is not None, options))
        i = end + 1
    return blocks


BLOCKS = [b for page in PAGES for b in read_blocks(page)]
RUNNABLE = [b for b in BLOCKS if b.runnable]


def logical_lines(text: str) -> list[str]:
    """Shell lines with backslash continuations joined."""
    out, pending = [], ""
    for line in text.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
        else:
            out.append(pending + line)
            pending = ""
    return out + ([pending] if pending else [])


def shown_commands(block: Block, program: str) -> list[list[str]]:
    """Every ``program ...`` line of a shell block, split like the shell (comments dropped)."""
    if block.lang not in SHELL_LANGS:
        return []
    return [shlex.split(line.strip(), comments=True) for line in logical_lines(block.text)
            if line.strip().split(" ", 1)[0] == program]


# ------------------------------------------------------------------ the CLI parser
def _cli_parser():
    from voxelflow.cli import build_parser

    return build_parser()


def _subcommands(parser) -> dict:
    import argparse

    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def cli_problems(argv: list[str]) -> list[str]:
    """Why ``voxelflow ARGV`` would not parse (empty when it does)."""
    parser = _cli_parser()
    commands = _subcommands(parser)
    if not argv or argv[0] not in commands:
        return [f"unknown command {argv[:1]} (commands: {', '.join(commands)})"]
    known = commands[argv[0]]._option_string_actions
    problems = [f"unknown option {tok}" for tok in argv[1:]
                if tok.startswith("--") and tok.split("=", 1)[0] not in known]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(argv)
    except SystemExit as exc:
        if exc.code:
            problems.append(err.getvalue().strip().splitlines()[-1])
    return problems


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return {m.group(1) for m in re.finditer(r"^([A-Za-z][\w-]*)\s*:", text, re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shown_command_parses(page):
    """Each ``voxelflow COMMAND --option ...`` line, run or not, is accepted by the CLI."""
    problems = []
    for block in read_blocks(page):
        for argv in shown_commands(block, "voxelflow"):
            problems += [f"{block.id}: voxelflow {shlex.join(argv[1:])}: {p}"
                         for p in cli_problems(argv[1:])]
        for argv in shown_commands(block, "make"):
            problems += [f"{block.id}: make {t}: no such Makefile target"
                         for t in argv[1:] if t not in make_targets()]
    assert not problems, "\n".join(problems)


def test_the_checks_can_fail():
    """The parser check rejects renamed options, unknown commands and bad values."""
    assert cli_problems(["frames", "clip.mp4", "--name", "c", "--fps", "2"]) == []
    assert cli_problems(["frames", "clip.mp4", "--name", "c", "--frame-rate", "2"])
    assert cli_problems(["frame", "clip.mp4", "--name", "c"])
    assert cli_problems(["frames", "clip.mp4", "--name", "c", "--resize", "stretch"])
    assert cli_problems(["fit", "--features", "f", "--bold", "b", "--lags", "4"])  # no test split
    block = Block(ROOT / "x.md", 1, "", "voxelflow status \\\n  --store s.zarr  # a comment\n", False)
    assert shown_commands(block, "voxelflow") == [["voxelflow", "status", "--store", "s.zarr"]]


def test_every_option_is_documented_in_cli_md():
    """docs/cli.md names every command (as a heading) and every one of its options."""
    text = (DOCS / "cli.md").read_text()
    missing = []
    for name, sub in _subcommands(_cli_parser()).items():
        if not re.search(rf"^#+ `voxelflow {re.escape(name)}\b", text, re.M):
            missing.append(f"no heading for voxelflow {name}")
        for option in sub._option_string_actions:
            if option.startswith("--") and option != "--help" and option not in text:
                missing.append(f"voxelflow {name} {option}")
    assert not missing, "not in docs/cli.md: " + ", ".join(missing)


# ------------------------------------------------------------------ TOML and Python
def _placeholders(data: dict, base: Path) -> None:
    """Empty files for every input path an experiment file names (the loader checks them)."""
    names = [*data.get("stimulus", {}).get("videos", []), *data.get("bold", {}).get("runs", [])]
    names += [data.get(s, {}).get(k) for s, k in (("bold", "mask"), ("report", "atlas"),
                                                  ("report", "atlas_labels"))]
    names += [m["checkpoint"] for m in data.get("models", []) if "checkpoint" in m]
    names += [f for m in data.get("models", []) for f in [*m.get("events", []),
                                                           *m.get("files", [])]]
    for name in filter(None, names):
        (base / name).parent.mkdir(parents=True, exist_ok=True)
        (base / name).touch()


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang == "toml" and not b.runnable],
                         ids=lambda b: b.id)
def test_shown_experiment_files_load(block, tmp_path):
    """Every TOML block is a valid experiment file (inputs replaced by empty files)."""
    from voxelflow.pipeline.study.config import load_experiment

    _placeholders(tomllib.loads(block.text), tmp_path)
    path = tmp_path / "study.toml"
    path.write_text(block.text)
    exp = load_experiment(path)
    assert exp.models and exp.lag_sets


def _voxelflow_imports(tree: ast.AST) -> list[tuple[str, list[str]]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "voxelflow":
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.split(".")[0] == "voxelflow"]
    return found


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang == "python"], ids=lambda b: b.id)
def test_shown_python_compiles_and_its_imports_exist(block):
    tree = ast.parse(block.text, filename=block.id)
    for module, names in _voxelflow_imports(tree):
        imported = importlib.import_module(module)
        for name in names:
            assert hasattr(imported, name) or _is_submodule(module, name), \
                f"{block.id}: from {module} import {name}: no such name"


def _is_submodule(package: str, name: str) -> bool:
    try:
        return importlib.util.find_spec(f"{package}.{name}") is not None
    except ModuleNotFoundError:  # ``package`` is a module, not a package
        return False


# ------------------------------------------------------------------ links and length
def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = page.read_text()
    in_code = False
    anchors = set()
    for line in text.splitlines():
        if _FENCE.match(line):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            anchors.add(_slug(line.lstrip("#")))
    return anchors


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(page):
    broken = []
    for target in _LINK.findall(page.read_text()):
        if re.match(r"^[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading with that anchor in {dest.name}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_readme_is_short_and_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES
    unlinked = [p.name for p in DOCS.glob("*.md") if f"(docs/{p.name}" not in readme]
    assert not unlinked, f"docs pages not linked from README.md: {unlinked}"


# ------------------------------------------------------------------ running the blocks
@dataclass
class PageRun:
    """The folder and Python namespace that one page's runnable blocks share."""

    work: Path
    namespace: dict = field(default_factory=lambda: {"__name__": "__docs__"})
    failed: str | None = None


@pytest.fixture(scope="module")
def page_runs(tmp_path_factory):
    """One folder per page (created on first use) with ``clip.mp4`` and ``../shared``."""
    from voxelflow.pipeline.synthetic.movies import write_scene_movie

    clip = tmp_path_factory.mktemp("docs-inputs") / "clip.mp4"
    write_scene_movie(clip, 24, rate=8, size=(64, 64), scene_seconds=2.0, seed=0)
    runs: dict[Path, PageRun] = {}

    def get(page: Path) -> PageRun:
        if page not in runs:
            base = tmp_path_factory.mktemp(page.stem)
            if SHARED_DATA.exists():
                (base / "shared").mkdir()
                (base / "shared" / "data").symlink_to(SHARED_DATA.resolve())
            (base / "work").mkdir()
            shutil.copy(clip, base / "work" / "clip.mp4")
            runs[page] = PageRun(base / "work")
        return runs[page]

    return get


# ``voxelflow ARGS``: the arguments, folder and environment go into files of a folder
# per call, whose name is a line on the request pipe; this process runs the command,
# writes its output there and answers the exit status through the call's FIFO; the
# function prints the output (in the shell's place: pipes, ``$(...)`` and redirections
# see it) and returns the status. Calls made at once (``a | b``, ``&``) queue.
_SHELL_PRELUDE = """set -e
voxelflow() {
  local c status
  c=$(mktemp -d "$VOXELFLOW_TEST_CHANNEL/call.XXXXXX")
  printf '%s\\0' "$@" > "$c/argv"
  env -0 > "$c/env"
  printf '%s' "$PWD" > "$c/cwd"
  mkfifo "$c/status"
  printf '%s\\n' "$c" >&"$VOXELFLOW_TEST_REQUESTS"
  read -r status < "$c/status" || exit 98
  cat "$c/stdout"
  cat "$c/stderr" >&2
  rm -r "$c"
  return "$status"
}
python() { "$VOXELFLOW_TEST_PYTHON" "$@"; }
"""
# Variables bash sets itself, and the thread counts (read once, when torch or a BLAS
# loads: set in this process they would change every later module's in-process runs).
_NOT_PASSED = {"PWD", "OLDPWD", "SHLVL", "_", *THREAD_VARS}


def _fields(path: Path) -> list[str]:
    return [os.fsdecode(f) for f in path.read_bytes().split(b"\0")[:-1]]


def _serve_one(call: Path) -> None:
    """Run the requested ``voxelflow ARGV`` here, in the shell's folder, seeing the
    shell's environment (less :data:`_NOT_PASSED`); answer its output and status."""
    env = dict(f.split("=", 1) for f in _fields(call / "env") if "=" in f)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            if key not in _NOT_PASSED and os.environ.get(key) != value:
                mp.setenv(key, value)
        for key in os.environ.keys() - env.keys() - _NOT_PASSED:
            mp.delenv(key)
        done = cli_here(*_fields(call / "argv"), cwd=Path((call / "cwd").read_text()))
    (call / "stdout").write_text(done.stdout)
    (call / "stderr").write_text(done.stderr)
    with open(call / "status", "w") as fifo:  # the shell is waiting on its end
        fifo.write(f"{done.returncode}\n")


def _run_shell(block: Block, work: Path) -> subprocess.CompletedProcess:
    """Run the block in ``bash -e``; serve its ``voxelflow`` calls in this process."""
    req_r, req_w = os.pipe()
    with tempfile.TemporaryDirectory() as channel:
        env = dict(os.environ, VOXELFLOW_TEST_PYTHON=sys.executable, VOXELFLOW_OFFLINE="1",
                   VOXELFLOW_TEST_CHANNEL=channel, VOXELFLOW_TEST_REQUESTS=str(req_w))
        env.setdefault("OMP_NUM_THREADS", "1")  # no spinning BLAS/torch threads here
        # the block's output into files: a full pipe could block bash while this
        # process waits for its next request
        with open(Path(channel) / "block.out", "w+") as out, \
                open(Path(channel) / "block.err", "w+") as err:
            try:
                proc = subprocess.Popen(["bash", "-c", _SHELL_PRELUDE + block.text], cwd=work,
                                        env=env, stdout=out, stderr=err, pass_fds=(req_w,))
            finally:
                os.close(req_w)
            try:
                with os.fdopen(req_r) as requests:
                    for line in requests:  # until bash exits (its end of the pipe closes)
                        _serve_one(Path(line.rstrip("\n")))
            except BaseException:
                proc.kill()  # it would wait for the answer forever
                raise
            finally:
                returncode = proc.wait(timeout=600)
            out.seek(0)
            err.seek(0)
            return subprocess.CompletedProcess(proc.args, returncode, out.read(), err.read())


def test_shell_voxelflow_behaves_like_the_program(tmp_path, monkeypatch):
    """The in-process ``voxelflow`` of shell blocks: its output goes through pipes and
    ``$(...)``, it runs in the shell's folder with the variables the block sets, and
    its exit status reaches ``set -e`` and the block's status."""
    (tmp_path / "sub").mkdir()
    block = Block(tmp_path / "x.md", 1, "", (
        "voxelflow frames --help | head -n 1\n"
        "cd sub\n"
        "line=$(FOO=bar voxelflow frames missing.mp4 --name x 2>&1 || true)\n"
        "echo \"[$line]\"\n"
        "voxelflow frames missing.mp4 --name x\n"
        "echo not reached\n"), True)
    seen = []
    real = cli_here

    def spy(*args, cwd):
        seen.append((args[0], cwd, os.environ.get("FOO")))
        return real(*args, cwd=cwd)

    monkeypatch.setitem(globals(), "cli_here", spy)
    done = _run_shell(block, tmp_path)
    assert done.returncode == 2, done
    lines = done.stdout.splitlines()
    assert lines[0].startswith("usage: voxelflow frames"), done.stdout
    assert lines[1] == "[voxelflow: error: missing.mp4: no such file; check the path]"
    assert "not reached" not in done.stdout
    assert done.stderr == "voxelflow: error: missing.mp4: no such file; check the path\n"
    assert seen == [("frames", tmp_path, None), ("frames", tmp_path / "sub", "bar"),
                    ("frames", tmp_path / "sub", None)]
    assert "FOO" not in os.environ


@pytest.mark.slow
@pytest.mark.parametrize("block", RUNNABLE, ids=lambda b: b.id)
def test_runnable_block(block, page_runs, monkeypatch):
    """Run the page's runnable blocks in order, in the page's folder."""
    if block.option("needs") == "haxby" and not HAXBY.exists():
        pytest.skip(f"real fMRI data not present: {HAXBY}")
    run = page_runs(block.page)
    if run.failed:
        pytest.skip(f"an earlier block of this page failed: {run.failed}")
    run.failed = block.id  # until it passes
    if block.option("file"):
        (run.work / block.option("file")).write_text(block.text)
    elif block.lang == "python":
        monkeypatch.chdir(run.work)
        exec(compile(block.text, block.id, "exec"), run.namespace)
    else:
        assert block.lang in SHELL_LANGS, f"{block.id}: cannot run a {block.lang!r} block"
        done = _run_shell(block, run.work)
        expected = int(block.option("exit", "0"))
        assert done.returncode == expected, (
            f"{block.id}: exit {done.returncode}, expected {expected}\n"
            f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}")
        if expected == 2:
            assert done.stderr.strip().splitlines()[-1].startswith("voxelflow: error: "), \
                done.stderr
    run.failed = None
