"""The commands README.md and docs/*.md show still run as written.

Every command found in a fenced shell block or an inline code span of those files is checked
without running it:
- `python X.py ...` (also after `torchrun` options or `python -m torch.distributed.run`): each
  `--flag` must be one of X.py's own flags, spelled out (argparse would accept a prefix; a reader
  should not need to). Where the command has no placeholder (`<run>`, `S`, `...`, `[--json]`),
  its whole argument list goes through X.py's parser, so a value of the wrong type or outside a
  flag's choices fails too. A bare `X.py` the repository lacks fails.
- `python -m pytest ...`: the test files it names exist, and a one-word `-k` selects a test.
- `pip install -r FILE`: FILE exists.
README.md's own references to repository files (`*.py`, `*.md`, pools/, tests/, docs/) and every
relative link in docs/*.md must name a file that exists.

How the flags are read: each entry point's `main(argv)` builds its argparse parser and calls
`parse_args` before any work, so the test imports the script and patches `parse_args` to hand
the parser back instead of parsing. A script whose main does not do that is asked for `--help`
in a subprocess instead. Files in docs/ are found by globbing, so documents added later are
checked by the same rules without being listed here.
"""
import argparse
import contextlib
import functools
import importlib
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHELL_LANGS = {"bash", "sh", "shell", "console", "zsh", ""}
RUNNERS = {"python", "python3", "torchrun"}
REDIRECT = re.compile(r"(?<!\S)\d*(>>?|<)(&\d+|\s*\S+)")
PLACEHOLDER = re.compile(r"<[^>]*>|\.\.\.|[\[\]]|(?<![A-Za-z0-9])[A-Z][A-Z0-9_]*(?![A-Za-z0-9])")
REPO_REF = re.compile(r"`([\w./-]+\.(?:py|md))`|`((?:pools|tests|docs|prefix_attn)/[\w./-]+)`|\]\(([^)#\s]+)\)")


def documents() -> list[Path]:
    return [ROOT / "README.md"] + sorted((ROOT / "docs").glob("**/*.md"))


# ---------------------------------------------------------------- finding commands

def commands_in(text: str) -> list[tuple[int, str]]:
    """(line number, command text) for every command in fenced shell blocks and inline code spans."""
    found, prose, fence, lang = [], [], None, ""
    lines = text.splitlines()
    k = 0
    while k < len(lines):
        line = lines[k]
        opening = re.match(r"\s*(```+|~~~+)\s*([\w+-]*)", line)
        if fence is None and opening:
            fence, lang = opening.group(1), opening.group(2).lower()
            prose.append("")
        elif fence is not None and line.strip().startswith(fence):
            fence = None
            prose.append("")
        elif fence is not None:
            start = k
            while line.rstrip().endswith("\\") and k + 1 < len(lines):     # continuation lines
                k += 1
                line = line.rstrip()[:-1] + " " + lines[k]
            command = re.sub(r"^\s*\$\s+", "", line).strip()
            first = command.split(" ", 1)[0] if command else ""
            if lang in SHELL_LANGS and command and (lang or first in RUNNERS | {"pip"}):
                found.append((start + 1, command))
            prose.append("")
        else:
            prose.append(line)
        k += 1
    joined = "\n".join(prose)
    for span in re.finditer(r"(?<!`)`([^`]+)`(?!`)", joined):
        command = " ".join(span.group(1).split())
        if command.split(" ", 1)[0] in RUNNERS:
            found.append((joined.count("\n", 0, span.start()) + 1, command))
    return found


def segments(command: str) -> list[list[str]]:
    """The simple commands of a shell line (split at && || ; | and parentheses), without
    comments, redirections and leading VAR=value assignments."""
    lexer = shlex.shlex(REDIRECT.sub(" ", command), posix=True, punctuation_chars="();&|")
    lexer.whitespace_split = True
    try:
        tokens = list(lexer)
    except ValueError:          # an unbalanced quote: not a shell command
        return []
    out, current = [], []
    for token in tokens + [";"]:
        if token and set(token) <= set("();&|"):
            while current and re.match(r"^[A-Za-z_]\w*=", current[0]):
                current.pop(0)
            if current and current[0] == "sudo":
                current.pop(0)
            if current:
                out.append(current)
            current = []
        else:
            current.append(token)
    return out


def script_call(words: list[str]) -> tuple[str, list[str]] | None:
    """(script, its arguments) for a `python X.py` or `torchrun ... X.py` command."""
    if words[0] in ("python", "python3") and len(words) > 1:
        if words[1] == "-m" and len(words) > 2 and words[2] == "torch.distributed.run":
            words = ["torchrun"] + words[3:]
        elif words[1].startswith("-"):
            return None
        else:
            return words[1], words[2:]
    if words[0] == "torchrun":
        for k, word in enumerate(words[1:], 1):
            if word.endswith(".py"):
                return word, words[k + 1:]
    return None


# ---------------------------------------------------------------- an entry point's flags

class _Parser(Exception):
    def __init__(self, parser):
        super().__init__("parser captured")
        self.parser = parser


def _hand_back(self, *args, **kwargs):
    raise _Parser(self)


@functools.cache
def flags_of(script: str) -> tuple[frozenset, argparse.ArgumentParser | None]:
    """The option strings of `script`'s command line, and its parser when it could be captured."""
    path = ROOT / script
    if path.parent == ROOT and path.stem.isidentifier():
        module = importlib.import_module(path.stem)
        main = getattr(module, "main", None)
        source = path.read_text()
        if main is not None and ("parse_config" in source or "parse_args" in source or "parse_known_args" in source):
            saved = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args
            argparse.ArgumentParser.parse_args = argparse.ArgumentParser.parse_known_args = _hand_back
            try:
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    main([])
            except _Parser as captured:
                parser = captured.parser
                return frozenset(s for a in parser._actions for s in a.option_strings), parser
            finally:
                argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args = saved
    run = subprocess.run([sys.executable, str(path), "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, f"{script} --help failed: {run.stderr[-500:]}"
    return frozenset(re.findall(r"(?<![\w-])(--?[A-Za-z0-9][\w-]*)", run.stdout)), None


def check_script(script: str, args: list[str]) -> None:
    if not (ROOT / script).is_file():
        assert not re.fullmatch(r"[\w-]+\.py", script), f"{script}: no such script in the repository"
        return                   # a script outside the repository (another tool's): not ours to check
    flags, parser = flags_of(script)
    for arg in args:
        flag = arg.strip("[]").split("=", 1)[0]
        if re.match(r"--?[A-Za-z]", flag):
            assert flag in flags, f"{script} has no flag {flag} (its flags: {' '.join(sorted(flags))})"
    if parser is not None and not any(PLACEHOLDER.search(a) for a in args):
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                parser.parse_args(args)
        except SystemExit as e:
            if e.code:
                pytest.fail(f"{script} {' '.join(args)}: {err.getvalue().strip()}")


def check_pytest(args: list[str]) -> None:
    files = [a.split("::")[0] for a in args if a.startswith("tests")]
    for f in files:
        assert (ROOT / f).exists(), f"{f}: no such test file"
    for k, a in enumerate(args[:-1]):
        if a == "-k" and re.fullmatch(r"\w+", args[k + 1]):
            targets = [ROOT / f for f in files if f.endswith(".py")] or sorted((ROOT / "tests").glob("test_*.py"))
            names = [n for t in targets for n in re.findall(r"^\s*(?:async\s+)?def\s+(test\w*)", t.read_text(), re.M)]
            assert any(args[k + 1].lower() in n.lower() for n in names), f"-k {args[k + 1]} selects no test in {files}"


def check(words: list[str]) -> None:
    call = script_call(words)
    if call is not None:
        check_script(*call)
    elif words[0].startswith("python") and words[1:3] == ["-m", "pytest"]:
        check_pytest(words[3:])
    elif words[0] in ("pip", "pip3") or words[:3] in (["python", "-m", "pip"], ["python3", "-m", "pip"]):
        for k, a in enumerate(words[:-1]):
            if a in ("-r", "--requirement"):
                assert (ROOT / words[k + 1]).is_file(), f"{words[k + 1]}: no such file"


# ---------------------------------------------------------------- the tests

@pytest.mark.parametrize("doc", documents(), ids=lambda d: str(d.relative_to(ROOT)))
def test_documented_commands_parse(doc):
    problems = []
    for line, command in commands_in(doc.read_text()):
        for words in segments(command):
            try:
                check(words)
            except (AssertionError, pytest.fail.Exception) as e:
                problems.append(f"line {line}: {' '.join(words)}\n    {str(e).splitlines()[0]}")
    assert not problems, f"{len(problems)} command(s) in {doc.relative_to(ROOT)} do not parse:\n" + "\n".join(problems)


def test_readme_names_only_files_the_repository_has():
    text = (ROOT / "README.md").read_text()
    missing = set()
    for m in REPO_REF.finditer(text):
        ref = next(g for g in m.groups() if g)
        if m.group(3) and re.match(r"[a-z]+:", ref):     # a link to a web page
            continue
        if not (ROOT / ref).exists() and "<" not in ref:
            missing.add(ref)
    assert not missing, f"README.md names files the repository lacks: {sorted(missing)}"


def test_docs_links_resolve():
    missing = []
    for doc in documents()[1:]:
        for target in re.findall(r"\]\(([^)#\s]+)", doc.read_text()):
            if not re.match(r"[a-z]+:", target) and not (doc.parent / target).exists():
                missing.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not missing, missing


def test_the_readme_shows_its_entry_points():
    """The checks above would pass on a README with no commands: it must show every entry point,
    and its first fenced block must install the sandbox and the requirements and run infer.py."""
    text = (ROOT / "README.md").read_text()
    scripts = {call[0] for _, c in commands_in(text) for w in segments(c) if (call := script_call(w))}
    assert {"infer.py", "sft.py", "grpo.py", "bench.py", "convert_gguf.py", "curves.py"} <= scripts, scripts
    first = re.search(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M).group(1)
    assert "bubblewrap" in first and "pip install -r requirements.txt" in first and "python infer.py" in first


@pytest.mark.parametrize("command, problem", [
    ("python sft.py --steps 3 --no-such-flag", "no flag --no-such-flag"),
    ("python sft.py --ste 3", "no flag --ste"),                      # an abbreviation argparse would take
    ("python grpo.py --aggregation mean", "invalid choice"),
    ("python infer.py --eval --n three", "invalid int value"),
    ("cd x && python missing_script.py --help", "no such script"),
    ("python -m pytest tests/test_nothing_here.py", "no such test file"),
    ("python -m pytest tests/test_model.py -k no_test_is_named_this", "selects no test"),
])
def test_a_wrong_command_fails(command, problem):
    with pytest.raises((AssertionError, pytest.fail.Exception), match=problem):
        for words in segments(command):
            check(words)


def test_extraction_reads_blocks_spans_and_continuations():
    text = ("intro `python sft.py --steps 1` and `pip list`\n"
            "```bash\npython grpo.py --group 4 \\\n  --prompts 2   # a comment\n```\n"
            "```\nquestion: not a command\npython infer.py --eval\n```\n"
            "```python\nprint('code, not a command')\n```\n")
    assert [" ".join(c.split()) for _, c in commands_in(text)] == ["python grpo.py --group 4 --prompts 2 # a comment",
                                                  "python infer.py --eval", "python sft.py --steps 1"]
    assert segments("(command -v bwrap || apt-get install x) && A=1 python x.py --n 2 > out.txt 2>&1") == \
        [["command", "-v", "bwrap"], ["apt-get", "install", "x"], ["python", "x.py", "--n", "2"]]
