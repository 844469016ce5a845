"""Static security checks over `fragment_llm/`, and the CI wiring that enforces them.

Two independent scanners look at every module of the package:

- `ast_findings` parses the module and resolves import aliases, so `import torch as t;
  t.load(f)` and `from os import system` are caught as surely as the plain spellings;
- `code_text_findings` is the "grep" of the issue, run over the code only: `tokenize`
  blanks out comments and string literals first, so a docstring that says "never
  torch.load" does not trip it but `torch . load(f)` does.

Each rule is proven to fire on a planted snippet, so the package-wide tests can fail.
"""

from __future__ import annotations

import ast
import io
import re
import shutil
import subprocess
import sys
import tokenize
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fragment_llm"

# Modules whose loaders run code found in the data (or that exist only to do so).
BANNED_MODULES = {"pickle": "import of pickle", "cPickle": "import of pickle",
                  "_pickle": "import of pickle", "cloudpickle": "import of pickle",
                  "dill": "import of dill", "shelve": "import of shelve",
                  "joblib": "import of joblib", "yaml": "import of yaml"}
# Fully qualified names that execute code, spawn a shell, or unpickle.
BANNED_NAMES = {
    "torch.load": "torch.load", "torch.serialization.load": "torch.load",
    "marshal.load": "marshal.load", "marshal.loads": "marshal.load",
    "os.system": "os.system", "os.popen": "os.popen",
    "builtins.eval": "eval(", "builtins.exec": "exec(", "builtins.__import__": "__import__",
    "yaml.load": "yaml.load(", "yaml.unsafe_load": "yaml.load(", "yaml.full_load": "yaml.load(",
    # torch.distributed's object collectives pickle what they send and unpickle what arrives
    **{f"torch.distributed.{name}": "object collective" for name in (
        "broadcast_object_list", "all_gather_object", "gather_object",
        "scatter_object_list", "send_object_list", "recv_object_list")},
}
BANNED_BUILTIN_CALLS = {"eval": "eval(", "exec": "exec(", "__import__": "__import__",
                        "compile": "compile("}


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    rule: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.rule}"


# ------------------------------------------------------------------------ AST scanner


def _import_aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> what it stands for: `import torch as t` -> {'t': 'torch'}."""
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                local = alias.asname or alias.name.split(".")[0]
                aliases[local] = alias.name if alias.asname else local
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return aliases


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """`t.serialization.load` -> 'torch.serialization.load' (None if not a plain chain)."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([aliases.get(node.id, node.id), *reversed(parts)])


def _import_rules(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        module = node.module or ""
        names = [module] + [f"{module}.{alias.name}" for alias in node.names]
    rules = [BANNED_MODULES[name.split(".")[0]] for name in names
             if name.split(".")[0] in BANNED_MODULES]
    return rules + [BANNED_NAMES[name] for name in names if name in BANNED_NAMES]


def _call_rules(node: ast.Call, aliases: dict[str, str]) -> list[str]:
    rules = []
    if isinstance(node.func, ast.Name) and node.func.id in BANNED_BUILTIN_CALLS:
        rules.append(BANNED_BUILTIN_CALLS[node.func.id])  # model.eval() is an Attribute
    for keyword in node.keywords:
        literal_false = isinstance(keyword.value, ast.Constant) and keyword.value.value is False
        if keyword.arg == "shell" and not literal_false:
            rules.append("shell=True")
        if keyword.arg == "allow_pickle" and not literal_false:
            rules.append("allow_pickle")
    is_getattr = isinstance(node.func, ast.Name) and node.func.id == "getattr"
    if is_getattr and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
        owner = _dotted(node.args[0], aliases)
        if owner and f"{owner}.{node.args[1].value}" in BANNED_NAMES:  # getattr(torch, "load")
            rules.append(BANNED_NAMES[f"{owner}.{node.args[1].value}"])
    return rules


def ast_findings(source: str, path: str = "<snippet>") -> list[Finding]:
    """Every banned import, name or call in `source`, by line."""
    tree = ast.parse(source, filename=path)
    aliases = _import_aliases(tree)
    found: list[Finding] = []
    for node in ast.walk(tree):
        rules: list[str] = []
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            rules = _import_rules(node)
        elif isinstance(node, ast.Call):
            rules = _call_rules(node, aliases)
        elif isinstance(node, ast.Attribute):
            name = _dotted(node, aliases)
            rules = [BANNED_NAMES[name]] if name in BANNED_NAMES else []
        found += [Finding(path, getattr(node, "lineno", 0), rule) for rule in rules]
    return found


# ------------------------------------------------------------------- text scanner


def code_only(source: str) -> str:
    """`source` with every comment and string literal replaced by spaces, lines kept."""
    lines = source.splitlines(keepends=True)
    blank = {tokenize.COMMENT, tokenize.STRING}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in blank:
            continue
        (row, col), (end_row, end_col) = token.start, token.end
        for r in range(row, end_row + 1):
            text = lines[r - 1]
            start = col if r == row else 0
            stop = end_col if r == end_row else len(text.rstrip("\n"))
            lines[r - 1] = text[:start] + " " * (stop - start) + text[stop:]
    return "".join(lines)


# The issue's grep, as regular expressions over code: `.eval(` and `def eval(` are
# method calls and definitions, not the builtin.
TEXT_RULES = {
    "import of pickle": re.compile(r"\b(?:import|from)\s+(?:c|_|cloud)?[pP]ickle\b"),
    "import of dill": re.compile(r"\b(?:import|from)\s+dill\b"),
    "torch.load": re.compile(r"\btorch\s*\.\s*load\b"),
    "eval(": re.compile(r"(?<![\w.])(?<!def )eval\s*\("),
    "exec(": re.compile(r"(?<![\w.])(?<!def )exec\s*\("),
    "yaml.load(": re.compile(r"\byaml\s*\.\s*(?:unsafe_|full_)?load\s*\("),
    "shell=True": re.compile(r"\bshell\s*=\s*True\b"),
    "os.system": re.compile(r"\bos\s*\.\s*(?:system|popen)\b"),
    "__import__": re.compile(r"\b__import__\b"),
    "marshal.load": re.compile(r"\bmarshal\s*\.\s*loads?\b"),
}


def code_text_findings(source: str, path: str = "<snippet>") -> list[Finding]:
    found = []
    for number, line in enumerate(code_only(source).splitlines(), start=1):
        found += [Finding(path, number, rule) for rule, pattern in TEXT_RULES.items()
                  if pattern.search(line)]
    return found


# ------------------------------------------------------------- the package itself


def package_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_the_scan_covers_the_whole_package():
    modules = package_modules()
    folders = {path.parent.name for path in modules}
    assert {"cli", "checkpoint", "tokenizer", "safety", "inference", "data", "model",
            "train"} <= folders
    assert len(modules) >= 30


@pytest.mark.parametrize("scanner", [ast_findings, code_text_findings])
def test_package_has_no_banned_construct(scanner):
    found = []
    for path in package_modules():
        found += scanner(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    assert not found, "\n".join(map(str, found))


# ------------------------------------------------------- the scanners can fail

PLANTED = {
    "import pickle": ("import pickle\n", "import of pickle"),
    "from pickle": ("from pickle import loads\n", "import of pickle"),
    "cPickle": ("import cPickle as p\n", "import of pickle"),
    "dill": ("import dill\n", "import of dill"),
    "marshal.loads": ("import marshal\nmarshal.loads(b'')\n", "marshal.load"),
    "torch.load": ("import torch\nstate = torch.load('model.pt')\n", "torch.load"),
    "torch.load with spaces": ("import torch\ntorch . load(f)\n", "torch.load"),
    "eval call": ("x = eval(text)\n", "eval("),
    "exec call": ("exec(code, {})\n", "exec("),
    "yaml.load": ("import yaml\nyaml.load(stream, Loader=yaml.Loader)\n", "yaml.load("),
    "shell=True": ("import subprocess\nsubprocess.run(cmd, shell=True)\n", "shell=True"),
    "os.system": ("import os\nos.system('ls')\n", "os.system"),
    "__import__": ("mod = __import__('os')\n", "__import__"),
}
# Only the AST scanner resolves these disguises.
DISGUISED = {
    "aliased torch.load": ("import torch as t\nt.load(f)\n", "torch.load"),
    "from torch import load": ("from torch import load\nload(f)\n", "torch.load"),
    "from os import system": ("from os import system as run\nrun('ls')\n", "os.system"),
    "getattr(torch, 'load')": ("import torch\ngetattr(torch, 'load')(f)\n", "torch.load"),
    "builtins.eval": ("import builtins\nbuiltins.eval('1')\n", "eval("),
    "shell from a variable": ("import subprocess\nsubprocess.run(c, shell=flag)\n",
                              "shell=True"),
    "broadcast_object_list": ("import torch\ntorch.distributed.broadcast_object_list(b)\n",
                              "object collective"),
    "np.load allow_pickle": ("import numpy as np\nnp.load(f, allow_pickle=True)\n",
                             "allow_pickle"),
}
HARMLESS = {
    "comment": "x = 1  # never torch.load, eval(, exec(, pickle or shell=True\n",
    "docstring": 'def f():\n    """We never call torch.load(f) or yaml.load(s) or eval(x)."""\n',
    "string": "message = 'pickle-capable formats: import pickle; os.system(x)'\n",
    "multi-line string": "doc = '''\nimport pickle\nexec(code)\n'''\n",
    "method eval": "model.eval()\nself.eval(x)\n",
    "method named eval": "class A:\n    def eval(self):\n        return 1\n",
    "evaluate": "def evaluate(x):\n    return x\nevaluated = evaluate(1)\n",
    "safetensors load": "from safetensors.torch import load as load_bytes\nload_bytes(b'')\n",
    "shell=False": "import subprocess\nsubprocess.run(['ls'], shell=False)\n",
    "np.load without pickle": "import numpy as np\nnp.load(f, allow_pickle=False)\n",
    "json.loads": "import json\njson.loads(text)\n",
}


@pytest.mark.parametrize("source, rule", PLANTED.values(), ids=PLANTED)
@pytest.mark.parametrize("scanner", [ast_findings, code_text_findings])
def test_a_planted_banned_construct_is_caught(scanner, source, rule):
    rules = {finding.rule for finding in scanner(source)}
    assert rule in rules, rules


@pytest.mark.parametrize("source, rule", DISGUISED.values(), ids=DISGUISED)
def test_a_disguised_banned_construct_is_caught(source, rule):
    assert rule in {finding.rule for finding in ast_findings(source)}


@pytest.mark.parametrize("source", HARMLESS.values(), ids=HARMLESS)
@pytest.mark.parametrize("scanner", [ast_findings, code_text_findings])
def test_mentions_in_comments_strings_and_methods_are_not_findings(scanner, source):
    assert scanner(source) == []


def test_a_finding_names_the_file_and_line():
    (finding,) = ast_findings("x = 1\n\ny = eval(s)\n", "fragment_llm/evil.py")
    assert str(finding) == "fragment_llm/evil.py:3: eval("


def test_code_only_keeps_code_and_line_numbers():
    source = "a = 'torch.load'  # eval(x)\nb = '''\nexec(y)\n'''\nc = 2\n"
    blanked = code_only(source)
    assert blanked.splitlines()[0].rstrip() == "a ="
    assert "exec" not in blanked and "eval" not in blanked
    assert blanked.count("\n") == source.count("\n") and blanked.splitlines()[4] == "c = 2"


# ------------------------------------------------------- dependency floors and CI


def _lower_bound(requirements: list[str], name: str) -> Version:
    (req,) = [Requirement(r) for r in requirements if Requirement(r).name == name]
    floors = [Version(spec.version) for spec in req.specifier if spec.operator in (">=", ">")]
    assert floors, f"{name} has no lower bound in pyproject.toml"
    return max(floors)


def test_pyproject_declares_the_security_floors():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    dependencies = project["dependencies"]
    assert _lower_bound(dependencies, "pyarrow") >= Version("14.0.1")  # CVE-2023-47248
    assert _lower_bound(dependencies, "torch") >= Version("2.6")  # CVE-2025-32434
    assert any(Requirement(r).name == "bandit" for r in project["optional-dependencies"]["dev"])


def _commands(script: Path) -> list[list[str]]:
    """The script's command lines, split like a shell would (comments dropped)."""
    import shlex

    return [shlex.split(line, comments=True) for line in script.read_text().splitlines()
            if shlex.split(line, comments=True)]


def test_ci_runs_scripts_test_sh():
    assert ["bash", "scripts/test.sh"] in _commands(ROOT / ".ci" / "run")


def test_test_sh_runs_ruff_and_bandit_over_the_package():
    commands = _commands(ROOT / "scripts" / "test.sh")
    bandit = [c for c in commands if c[0].endswith("bandit")]
    assert bandit, "scripts/test.sh does not run bandit"
    (args,) = bandit
    assert args[args.index("-r") + 1] == "fragment_llm"
    assert args[args.index("--severity-level") + 1] == "medium"
    ruff = [c for c in commands if c[0].endswith("ruff")]
    assert ruff and ruff[0][1] == "check" and "fragment_llm" in ruff[0]
    assert any("pytest" in c for c in commands)


def test_bandit_finds_nothing_of_medium_or_high_severity():
    bandit = shutil.which("bandit", path=str(Path(sys.executable).parent))
    if bandit is None:
        pytest.skip("bandit is not installed (pip install -e '.[dev]')")
    done = subprocess.run([bandit, "-q", "-r", str(PACKAGE), "--severity-level", "medium",
                           "-f", "json"], capture_output=True, text=True, timeout=120,
                          check=False)
    import json

    report = json.loads(done.stdout)
    issues = [f"{r['filename']}:{r['line_number']}: {r['test_id']} {r['issue_text']}"
              for r in report["results"]]
    assert done.returncode == 0 and not issues, "\n".join(issues) or done.stderr
