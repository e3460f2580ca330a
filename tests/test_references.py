"""The repository carries its own design: every reference in the code and the docs to one of its
files, or to a heading of one of its pages, resolves; every code name a page cites in backticks
(`module.attr`) exists. The checker itself is tested on a few references made to fail."""
import dataclasses
import importlib
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# "docs/design.md#model", "training.md", "../README.md#results", "support/rundir.py"; not another
# repository's file written with its prefix ("ETB:docs/MODEL.md")
FILE_REF = re.compile(r"(?<![\w/.:-])((?:\.\./|\./)?(?:[\w-]+/)*[\w-]+\.md)(#[\w-]+)?")
PY_REF = re.compile(r"(?<![\w/.-])((?:support|scoring|measure|tests)/\w+\.py)\b")
LINK = re.compile(r"\]\(([^)\s]+)\)")  # a markdown link's target
# `module.attr`; a file name (`config.py`, `model.safetensors`) is not a code name
CODE_NAME = re.compile(r"`([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*\.(?!(?:py|md|html|json|jsonl|safetensors|txt|pt|png|mp4|sh)`)[A-Za-z_]\w*)`")
SELF = Path(__file__).resolve()  # holds broken references on purpose


def tracked(*suffixes):
    """The repository's own files (tracked, or new and not ignored) with these suffixes."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / f for f in out if f.endswith(suffixes) and (ROOT / f).is_file()]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: markdown links and code marks dropped, lowercase, every
    character but letters, digits, '_', '-' and spaces removed, spaces made '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set:
    """The anchors of a markdown page's headings (repeats numbered -1, -2, ... as GitHub does),
    headings inside fenced code blocks left out."""
    out, seen, fenced = set(), {}, False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        m = None if fenced else re.match(r"#{1,6} (.+)", line)
        if m:
            s = slug(m.group(1))
            out.add(s if s not in seen else f"{s}-{seen[s]}")
            seen[s] = seen.get(s, 0) + 1
    return out


def target_of(ref: str, source: Path) -> Path | None:
    """The file a reference names: relative to the file that makes it, to the repository root, or a
    page of docs/ named bare (a code comment saying "training.md")."""
    for base in (source.parent, ROOT, ROOT / "docs"):
        p = (base / ref).resolve()
        if p.is_file() and ROOT in p.parents:
            return p
    return None


def broken(source: Path, text: str) -> list:
    """The references in `text` (of file `source`) that do not resolve: "source: ref (why)"."""
    bad = []
    refs = [(m.group(1), m.group(2)) for m in FILE_REF.finditer(text)]
    if source.suffix == ".md":  # links: other pages, files, this page's own anchors
        for t in LINK.findall(text):
            if re.match(r"[a-z]+:", t):
                continue
            path, _, anchor = t.partition("#")
            if not path.endswith(".md"):
                refs.append((path or source.name, f"#{anchor}" if anchor else None))
            elif anchor and not any(r == (path, f"#{anchor}") for r in refs):
                refs.append((path, f"#{anchor}"))
    for ref, anchor in refs:
        target = source if ref == source.name else target_of(ref, source)
        if target is None:
            bad.append(f"{source.relative_to(ROOT) if ROOT in source.parents else source.name}: {ref} (no such file)")
        elif anchor and target.suffix == ".md" and anchor[1:] not in anchors(target):
            bad.append(f"{source.relative_to(ROOT) if ROOT in source.parents else source.name}: {ref}{anchor} "
                       "(no such heading)")
    for ref in PY_REF.findall(text):
        if not (ROOT / ref).is_file():
            bad.append(f"{source.name}: {ref} (no such file)")
    return bad


def unresolved_names(text: str, not_ours=()) -> list:
    """The backticked dotted names of a page whose first part is one of the repository's modules
    (but `not_ours`) and that do not resolve (getattr, or a dataclass's field)."""
    ours = {p.stem for p in ROOT.glob("*.py")} | {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    ours -= set(not_ours)
    bad = []
    for name in sorted(set(CODE_NAME.findall(text))):
        parts = name.split(".")
        if parts[0] not in ours:
            continue
        obj, i = None, len(parts)
        while i > 0:  # the longest importable prefix: `support.released.RENAMES`, `model.D2VLM.forward`
            try:
                obj = importlib.import_module(".".join(parts[:i]))
                break
            except ImportError:
                i -= 1
        for attr in parts[i:]:
            fields = {f.name for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else set()
            if hasattr(obj, attr):
                obj = getattr(obj, attr)
            elif attr in fields:
                obj = None
            else:
                bad.append(name)
                break
    return bad


def test_every_reference_in_code_and_docs_resolves():
    files = tracked(".py", ".md", ".ini", ".txt", "run")
    assert len(files) > 60 and any(f.name == "paper.md" for f in files)
    bad = [b for f in files if f != SELF for b in broken(f, f.read_text(encoding="utf-8"))]
    assert not bad, "\n".join(bad)


def test_every_code_name_the_docs_cite_exists():
    pages = tracked(".md")
    # release.md writes the release's tensor and config names (`model.embed_tokens`, `config.model_name_or_path`)
    bad = {p.name: unresolved_names(p.read_text(encoding="utf-8"), ("model", "config") if p.name == "release.md" else ())
           for p in pages}
    assert not any(bad.values()), {k: v for k, v in bad.items() if v}
    cited = set(CODE_NAME.findall((ROOT / "docs" / "paper.md").read_text(encoding="utf-8")))
    # the paper's page cites the functions of each step of the method
    assert {"evidence.similarity", "losses.grounding_bce", "losses.consistency_l1", "fpo.grounding_logprob",
            "fpo.fpo_loss", "model.D2VLM.capture_evidence", "decoding.localize_and_capture"} <= cited


@pytest.mark.parametrize("text, why", [
    ("see NOTES.md §2", "no such file"),
    ("the facts in ../elsewhere/facts.md", "no such file"),
    ("docs/design.md#no-such-section", "no such heading"),
    ("[the rules](scoring-rules.md#tvg-and-epmm)", "no such heading"),
    ("support/nothing.py", "no such file"),
])
def test_the_checker_finds_what_is_broken(text, why):
    assert any(why in b for b in broken(ROOT / "docs" / "x.md", text)), text


def test_the_checker_passes_what_is_right():
    assert broken(ROOT / "docs" / "paper.md", "[rules](scoring-rules.md#tvg-and-epm) and docs/design.md#model, "
                                              "support/rundir.py, [README](../README.md#quickstart)") == []
    assert unresolved_names("`evidence.similarity`, `config.D2VLMConfig.w_gnd`, `torch.round`") == []
    assert unresolved_names("`evidence.no_such_thing`, `model.Prompt.nothing`") == ["evidence.no_such_thing",
                                                                                    "model.Prompt.nothing"]
    assert slug("RAR, ECA, RVQ") == "rar-eca-rvq" and slug("The four E.T.Bench scripts") == "the-four-etbench-scripts"
    assert slug("The parser `dvc_format(a)`") == "the-parser-dvc_formata"
