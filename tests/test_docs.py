"""What README.md and docs/*.md say exists does exist: stage names, ``-S`` overrides, repository paths and links, and
the README's headline numbers. Reads files only (dvc.yaml, the params files, the committed metrics): no DVC, no
training; about a second.

- **Stage names**: every ``<stage>@<item>`` written in code (inline or fenced), every target of a ``dvc repro`` /
  ``dvc commit`` / ``dvc status`` command, and the first column of a table headed ``stage`` is a stage of dvc.yaml.
  ``foreach`` / ``matrix`` stages are expanded as DVC names them (``name@item``, ``name@<key>``, ``name@a-b``) with
  the values of params.yaml and params.paper.yaml; a placeholder (``<task>``) stands for any item, but the base name
  and the literal parts must match.
- **Overrides**: the ``-S key=value`` of one command (fenced or inline) are applied together by
  :func:`vldistill.config.load`, as a stage applies them, and must validate against params.yaml or params.paper.yaml
  (``--params FILE`` in the command: that file). A leading ``+`` (DVC's "add this key") is dropped, as DVC writes the
  key into params.yaml. A ``$ command`` followed by an ``error: params...`` line is a documented refusal instead: it
  must fail with that line (``...`` in the documented line stands for any text).
- **Paths**: every repository path in inline code or a link (first component a top-level entry of the repository,
  or ``../`` links from docs/) exists in the work tree (tracked or not ignored), lies in or above an output dvc.yaml
  declares (``reports/figures`` is one, so ``reports/figures/headline.png`` passes before it is written), is a path
  the params files name (``data/official/...``) or is git-ignored (``checkpoints/``, ``mlflow.db``). Bare ``*.py``
  names must be a file of the repository, bare ``*.yaml`` / ``*.toml`` / ``*.lock`` names a file at its root.
  ``<placeholder>`` components match any name, ``{a,b}`` is expanded, a component with ``...`` ends the path.
  Links to ``file.md#anchor`` need that heading.
- **Headline table**: each cell of README.md's results table is the committed test score of its model as the
  report formats it (one decimal, %): the teacher's ``metrics/eval/<task>/teacher.json``; a student's
  ``mean ± std [low, high]`` over its replicas ``metrics/eval/<task>/<model>_seed<k>.json`` for every seed of
  params.yaml's ``seeds``, or, for a run made before that layout (no complete set of replicas), its single
  ``metrics/eval/<task>/<model>.json``.
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PARAMS_FILES = ("params.yaml", "params.paper.yaml")

HEADLINE_MODELS = ("teacher", "dide", "dual_gt")
HEADLINE_COLUMNS = {  # README header cell -> (task, metric of the test split)
    "NLVR2 acc.": ("nlvr2", "accuracy"),
    "SNLI-VE acc.": ("snli_ve", "accuracy"),
    "VQA score": ("vqa", "vqa_score"),
    "retrieval IR R@1": ("retrieval", "ir_r1"),
    "retrieval TR R@1": ("retrieval", "tr_r1"),
}
FLAGS_WITH_VALUE = {"-S", "--set", "--set-param", "-n", "--name", "-j", "--jobs", "--params"}
PLACEHOLDER = re.compile(r"<[^<>]+>")


def _rel(doc: Path) -> str:
    return str(doc.relative_to(ROOT))


# ------------------------------------------------------------------------------------------------ markdown parsing
def _split(text: str) -> tuple[str, list[tuple[str, list[str]]]]:
    """(prose with fenced blocks blanked, [(info string, lines) of each fenced block])."""
    prose, blocks, block, info = [], [], None, ""
    for line in text.splitlines():
        fence = re.match(r"\s*```(.*)$", line)
        if fence and block is None:
            block, info = [], fence.group(1).strip()
            prose.append("")
        elif fence:
            blocks.append((info, block))
            block = None
            prose.append("")
        elif block is not None:
            block.append(line.strip())
            prose.append("")
        else:
            prose.append(line)
    return "\n".join(prose), blocks


def _inline_code(prose: str) -> list[str]:
    """Code spans, a span broken over lines joined again."""
    return [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]


def _links(prose: str) -> list[str]:
    return re.findall(r"\]\(([^)\s]+)\)", prose)


def _commands(blocks: list[tuple[str, list[str]]]) -> list[tuple[str, list[str]]]:
    """(command line, documented output lines) of every fenced block that holds commands: in a block with ``$ ``
    prompts, the prompted lines (the others are their output); else every line of a bash/sh/shell block, ``\\``
    continuations joined."""
    out = []
    for info, lines in blocks:
        if info.startswith("python"):
            continue
        if any(line.startswith("$ ") for line in lines):
            for line in lines:
                if line.startswith("$ "):
                    out.append((line[2:], []))
                elif out:
                    out[-1][1].append(line)
        elif info in ("bash", "sh", "shell", "console"):
            joined = ""
            for line in lines:
                joined += line
                if joined.endswith("\\"):
                    joined = joined[:-1] + " "
                    continue
                if joined.strip():
                    out.append((joined.strip(), []))
                joined = ""
    return out


@lru_cache(maxsize=None)
def _parsed(doc: Path):
    prose, blocks = _split(doc.read_text())
    return prose, blocks, _inline_code(prose), _links(prose), _commands(blocks)


def _words(command: str, where: str) -> list[str]:
    try:
        return shlex.split(command, comments=True)
    except ValueError as err:
        pytest.fail(f"{where}: cannot split the command {command!r} ({err})")


# ------------------------------------------------------------------------------------------------------ dvc.yaml
def _lookup(tree, dotted: str):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def _interpolate(value: str, params: dict, item=None, key=None) -> str:
    def one(match: re.Match) -> str:
        expr = match.group(1).strip()
        if expr == "item" or expr.startswith("item."):
            got = item if expr == "item" else _lookup(item, expr[5:])
        elif expr == "key":
            got = key
        else:
            got = _lookup(params, expr)
        return str(got)

    return re.sub(r"\$\{([^}]+)\}", one, value)


def _resolve(value, params: dict):
    """A ``${...}`` that is the whole value (foreach / matrix lists) -> the params object itself."""
    if isinstance(value, str) and re.fullmatch(r"\$\{[^}]+\}", value.strip()):
        return _lookup(params, value.strip()[2:-1].strip())
    return value


def _expand(name: str, stage: dict, params: dict):
    """[(DVC's stage name, item, key)] of one dvc.yaml entry under one params file."""
    if "foreach" in stage:
        items = _resolve(stage["foreach"], params)
        if isinstance(items, dict):
            return [(f"{name}@{k}", v, k) for k, v in items.items()]
        assert all(not isinstance(v, (dict, list)) for v in items), f"{name}: foreach over a list of objects"
        return [(f"{name}@{v}", v, None) for v in items]
    if "matrix" in stage:
        axes = {axis: _resolve(values, params) for axis, values in stage["matrix"].items()}
        return [(f"{name}@" + "-".join(str(v) for v in combo), dict(zip(axes, combo)), None)
                for combo in itertools.product(*axes.values())]
    return [(name, None, None)]


def _path_entries(section) -> list[str]:
    return [next(iter(entry)) if isinstance(entry, dict) else entry for entry in section or []]


@lru_cache(maxsize=None)
def _pipeline() -> tuple[dict[str, set[str] | None], frozenset[str]]:
    """({base stage name: its items (None: not a foreach / matrix stage)}, every declared output path)."""
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    bases: dict[str, set[str] | None] = {}
    outputs: set[str] = set()
    for params_file in PARAMS_FILES:
        params = yaml.safe_load((ROOT / params_file).read_text())
        for name, stage in dvc.items():
            body = stage.get("do", stage)
            for full, item, key in _expand(name, stage, params):
                if "@" in full:
                    bases.setdefault(name, set()).add(full.split("@", 1)[1])
                else:
                    bases[name] = None
                for section in ("outs", "metrics", "plots"):
                    for path in _path_entries(body.get(section)):
                        outputs.add(_interpolate(path, params, item, key).rstrip("/"))
    return bases, frozenset(outputs)


def _item_pattern(text: str) -> re.Pattern:
    parts = PLACEHOLDER.split(text)
    return re.compile(".+".join(re.escape(part) for part in parts))


def _stage_problem(ref: str) -> str | None:
    """Why ``ref`` (``name`` or ``name@item``) is not a stage of dvc.yaml; None if it is."""
    bases, _ = _pipeline()
    if PLACEHOLDER.fullmatch(ref):
        return None  # `dvc commit <stage>`: any stage
    name, _, item = ref.partition("@")
    if name not in bases:
        return f"no stage {name!r} in dvc.yaml (stages: {sorted(bases)})"
    items = bases[name]
    if not item:
        return None if items is None else f"{name!r} is a foreach/matrix stage: name it {name}@<item>"
    if items is None:
        return f"{name!r} is a single stage, not {ref!r}"
    pattern = _item_pattern(item)
    if not any(pattern.fullmatch(candidate) for candidate in items):
        return f"no item {item!r} of {name} (items: {sorted(items)})"
    return None


STAGE_REF = re.compile(r"(?<![\w./\"-])([a-z][a-z_]*)@([\w<>.-]*[\w>])")  # not in a quoted JSON value


def _stage_refs(doc: Path) -> list[str]:
    prose, blocks, spans, _, commands = _parsed(doc)
    texts = spans + [line for _, lines in blocks for line in lines]
    refs = [f"{m.group(1)}@{m.group(2)}" for text in texts for m in STAGE_REF.finditer(text)]
    for command, _ in commands + [(span, []) for span in spans if span.startswith("dvc ")]:
        words = _words(command, _rel(doc))
        for at in (i for i, w in enumerate(words[:-1]) if w == "dvc" and words[i + 1] in ("repro", "commit", "status")):
            skip = False
            for word in words[at + 2:]:
                if skip:
                    skip = False
                elif word in FLAGS_WITH_VALUE:
                    skip = True
                elif word.startswith("-"):
                    continue
                elif word in ("&&", ";", "|") or word.startswith("#"):
                    break
                else:
                    refs.append(word)
    lines = prose.splitlines()
    for i, line in enumerate(lines):  # tables headed `| stage |`: the first column names stages
        if re.match(r"\|\s*stage\s*\|", line):
            for row in itertools.takewhile(lambda r: r.startswith("|"), lines[i + 2:]):
                refs += re.findall(r"`([^`]+)`", row.split("|")[1])
    return refs


# ----------------------------------------------------------------------------------------------- -S overrides
def _overrides(words: list[str]) -> tuple[list[str], str | None]:
    sets, params_file = [], None
    for flag, value in zip(words, words[1:]):
        if flag in ("-S", "--set", "--set-param") and "=" in value:
            sets.append(value.lstrip("+"))
        elif flag == "--params":
            params_file = value
    return sets, params_file


def _override_cases(doc: Path) -> list[tuple[str, list[str], str | None, list[str]]]:
    """(command, overrides, --params file or None, documented `error: params...` lines)."""
    _, _, spans, _, commands = _parsed(doc)
    cases = []
    for command, output in commands + [(span, []) for span in spans if re.search(r"(^|\s)-S\s", span)]:
        sets, params_file = _overrides(_words(command, _rel(doc)))
        sets = [s for s in sets if not PLACEHOLDER.search(s.split("=", 1)[0]) and "..." not in s]
        errors = [line for line in output if line.startswith("error: params")]
        if sets or errors:
            cases.append((command, sets, params_file, errors))
    return cases


def _validate(params_file: str, sets: list[str]) -> str | None:
    """The stage's one error line for these overrides, None when they validate."""
    from vldistill.config import ConfigError, load

    try:
        load(params_file, sets)  # relative: the error names the file as a stage's does
    except ConfigError as err:
        return f"error: {err}"
    return None


# ------------------------------------------------------------------------------------------------------- paths
@lru_cache(maxsize=None)
def _work_tree() -> frozenset[tuple[str, ...]]:
    """Every file of the work tree git knows of or would add, and every directory above one, as components."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.splitlines()
    known = set()
    for path in listed:
        parts = tuple(path.split("/"))
        known.update(parts[:n] for n in range(1, len(parts) + 1))
    return frozenset(known)


@lru_cache(maxsize=None)
def _params_paths() -> frozenset[str]:
    found = set()

    def walk(node):
        if isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
        elif isinstance(node, str) and "/" in node and not node.startswith(("http", "./")):
            found.add(node.rstrip("/"))

    for params_file in PARAMS_FILES:
        walk(yaml.safe_load((ROOT / params_file).read_text()))
    return frozenset(found)


@lru_cache(maxsize=None)
def _code_paths() -> frozenset[str]:
    """Quoted paths in the code: files a tool writes outside DVC (``metrics/bench/gpu.json``)."""
    found = set()
    for source in [*(ROOT / "src").rglob("*.py"), *(ROOT / "stages").glob("*.py")]:
        found.update(m.group(2).rstrip("/") for m in re.finditer(r"([\"'])([\w.-]+(?:/[\w.-]+)+/?)\1", source.read_text()))
    return frozenset(found)


def _roots() -> set[str]:
    _, outputs = _pipeline()
    return {parts[0] for parts in _work_tree()} | {out.split("/")[0] for out in outputs}


def _braces(path: str) -> list[str]:
    match = re.search(r"\{([^{}]*,[^{}]*)\}", path)
    if not match:
        return [path]
    return [expanded for choice in match.group(1).split(",")
            for expanded in _braces(path[:match.start()] + choice + path[match.end():])]


def _components(path: str) -> list[str]:
    parts = []
    for part in path.strip("/").split("/"):
        if "..." in part or "…" in part:
            break
        parts.append(part)
    return parts


def _matches(pattern: list[str], concrete: tuple[str, ...] | list[str]) -> bool:
    return all(_item_pattern(p).fullmatch(c) if PLACEHOLDER.search(p) else p == c for p, c in zip(pattern, concrete))


def _ignored(paths: list[str]) -> set[str]:
    if not paths:
        return set()
    done = subprocess.run(["git", "check-ignore", "--stdin"], cwd=ROOT, input="\n".join(paths), capture_output=True,
                          text=True)
    return set(done.stdout.splitlines())


def _path_candidates(doc: Path) -> list[tuple[str, str]]:
    """(repository-relative path, as written) for each path-like word of inline code and each local link."""
    _, _, spans, links, _ = _parsed(doc)
    roots = _roots()
    found = []
    for span in spans:
        for word in span.split():
            word = word.strip("(),;:'\"").removeprefix("./")
            if not word or "://" in word or ":" in word or "=" in word or word.startswith(("-", "$", "/")):
                continue
            if word.startswith("../"):
                continue  # a backticked path above the repository (the shared design notes): not ours to check
            if "/" in word:
                if word.split("/")[0] in roots:
                    found += [(p, word) for p in _braces(word)]
            elif re.fullmatch(r"[\w.-]+\.(yaml|yml|toml|lock)", word):
                found.append((word, word))
            elif re.fullmatch(r"[\w-]+\.py", word):
                found.append(("*/" + word, word))
    for link in links:
        if re.match(r"[a-z]+:", link) or link.startswith("#"):
            continue
        target = (doc.parent / link.split("#", 1)[0]).resolve()
        try:
            found.append((str(target.relative_to(ROOT)), link))
        except ValueError:
            pytest.fail(f"{_rel(doc)}: link {link!r} leaves the repository")
    return found


def _path_problems(doc: Path) -> list[str]:
    known = _work_tree()
    _, outputs = _pipeline()
    files = {parts[-1] for parts in known}
    unresolved = []
    for path, written in _path_candidates(doc):
        if path.startswith("*/"):
            if path[2:] not in files:
                unresolved.append((path, written, "no such file in the repository"))
            continue
        parts = _components(path)
        if len(parts) == 1 and "/" not in written and not (parts[0],) in known:
            unresolved.append((path, written, "no such file at the repository root"))
            continue
        if any(len(k) == len(parts) and _matches(parts, k) for k in known):
            continue
        if any(_matches(parts, out.split("/")) for out in outputs | _params_paths() | _code_paths()):
            continue  # in or above a declared output, or a path the params or the code name
        unresolved.append((path, written, "not in the repository, not a dvc.yaml output"))
    ignored = _ignored([PLACEHOLDER.sub("x", path) for path, _, _ in unresolved])
    return [f"{_rel(doc)}: {written!r}: {why}" for path, written, why in unresolved
            if PLACEHOLDER.sub("x", path) not in ignored]


def _slug(heading: str) -> str:
    text = re.sub(r"[`*_]", lambda m: "_" if m.group() == "_" else "", heading.strip().lower())
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text))


def _anchor_problems(doc: Path) -> list[str]:
    problems = []
    for link in _parsed(doc)[3]:
        if "#" not in link or re.match(r"[a-z]+:", link):
            continue
        page, anchor = link.split("#", 1)
        target = (doc.parent / page).resolve() if page else doc
        if target.suffix != ".md" or not target.is_file():
            continue
        headings = {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.+)$", _split(target.read_text())[0], re.M)}
        if anchor not in headings:
            problems.append(f"{_rel(doc)}: link {link!r}: no heading #{anchor} in {_rel(target)}")
    return problems


# ------------------------------------------------------------------------------------------------------- tests
def test_docs_exist_and_link_each_other():
    readme = (ROOT / "README.md").read_text()
    assert readme.startswith("# vldistill\n\n```bash\nmake repro   #"), "README.md opens with the make repro / test block"
    assert "make test    #" in readme.split("```")[1]
    linked = {(ROOT / link.split("#")[0]).resolve() for link in _parsed(ROOT / "README.md")[3]}
    for page in DOCS[1:]:
        assert page.resolve() in linked, f"README.md does not link {_rel(page)}"


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_stage_names_resolve(doc):
    refs = _stage_refs(doc)
    problems = [f"{ref!r}: {why}" for ref in sorted(set(refs)) if (why := _stage_problem(ref))]
    assert not problems, f"{_rel(doc)}:\n" + "\n".join(problems)


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_overrides_validate(doc, monkeypatch):
    monkeypatch.chdir(ROOT)
    problems = []
    for command, sets, params_file, errors in _override_cases(doc):
        files = (params_file,) if params_file else PARAMS_FILES
        answers = [_validate(f, sets) for f in files]
        if not errors:
            if all(answers):
                problems.append(f"{command!r}: refused by every params file: {answers}")
            continue
        shown = errors[0].replace("(...)", "...")
        wanted = re.compile(".*".join(re.escape(part) for part in shown.split("...")) + "$")
        if not wanted.match(answers[0] or ""):
            problems.append(f"{command!r}: documented {errors[0]!r}, the stage says {answers[0]!r}")
    assert not problems, f"{_rel(doc)}:\n" + "\n".join(problems)


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_paths_and_links_exist(doc):
    problems = _path_problems(doc) + _anchor_problems(doc)
    assert not problems, "\n".join(problems)


def test_headline_table_is_the_committed_run():
    lines = (ROOT / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|") and "R@1" in line)
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    assert header[1:] == list(HEADLINE_COLUMNS), header
    seen = set()
    for row in itertools.takewhile(lambda r: r.startswith("|"), lines[start + 2:]):
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        model = re.search(r"`(\w+)`", cells[0]).group(1)
        seen.add(model)
        for title, cell in zip(header[1:], cells[1:]):
            task, metric = HEADLINE_COLUMNS[title]
            expected, source = _headline_cell(task, model, metric)
            assert cell == expected, f"{model} {title}: README {cell!r}, {source}: {expected!r}"
    assert seen == set(HEADLINE_MODELS), seen


def _headline_cell(task: str, model: str, metric: str) -> tuple[str, str]:
    """(the report's test cell of ``model`` on ``task``, the files it comes from): a student's replicas of every seed
    of params.yaml's ``seeds`` when all are committed, else (the teacher, or a run made before the per-seed layout)
    its one ``metrics/eval/<task>/<model>.json``."""
    from vldistill.report.tables import TEACHER, score_cell, seed_scores

    eval_dir = ROOT / "metrics" / "eval" / task
    seeds = yaml.safe_load((ROOT / "params.yaml").read_text())["seeds"]
    if model != TEACHER and all((eval_dir / f"{model}_seed{seed}.json").is_file() for seed in seeds):
        summary, absent = seed_scores(ROOT / "metrics", task, model, seeds, "test", metric)
        replicas = f"metrics/eval/{task}/{model}_seed{{{','.join(map(str, seeds))}}}.json"
        return score_cell(summary, absent, model, 1), replicas
    path = eval_dir / f"{model}.json"
    assert path.is_file(), (f"README's table names {model!r}: neither {path.relative_to(ROOT)} nor a replica per seed "
                            f"of {seeds} (metrics/eval/{task}/{model}_seed<k>.json) is committed")
    value = json.loads(path.read_text())["test"][metric]
    return f"{100 * value:.1f}", str(path.relative_to(ROOT))
