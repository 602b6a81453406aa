"""The documentation against the checkout: every relative link of the README and docs/ leads to
a file (and heading) that exists, every repository path a reference page names in backticks
exists, and docs/worker.md's flags table is `kvrec worker`'s parser, flag for flag."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), ROOT / "deploy" / "README.md"]
# the pages that describe the code as it is now (docs/history/ is dated notes of what it was)
REFERENCE = [p for p in DOCS if "history" not in p.relative_to(ROOT).parts]
FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
TOP_DIRS = ("model/", "state/", "stream/", "bench/", "deploy/", "tests/", "docs/")
# folders the checkout does not hold until something makes them (.gitignore)
MADE_AT_RUN_TIME = ("deploy/kafka/cache/",)


def _prose(text: str) -> str:
    """The text outside fenced code blocks (a `# comment` in a bash block is no heading)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link: its text
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file, duplicates numbered as GitHub does."""
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", _prose(path.read_text()), re.M):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def broken_links(path: Path) -> list[str]:
    """The relative links of `path` whose file, or heading, does not exist."""
    problems = []
    for target in LINK.findall(_prose(path.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            problems.append(f"{path.name}: {target}: no such file")
        elif anchor and linked.is_dir():
            problems.append(f"{path.name}: {target}: an anchor into a folder")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            problems.append(f"{path.name}: {target}: no such heading in {linked.name}")
    return problems


def missing_paths(path: Path) -> list[str]:
    """Repository paths named in backticks (`stream/worker/loop.py`,
    `tests/test_x.py::test_y`) that do not exist in the checkout, or name no such test."""
    problems = []
    for code in re.findall(r"`([^`\n]+)`", _prose(path.read_text())):
        for word in code.split():
            word = word.strip(".,;:()")
            if (not word.startswith(TOP_DIRS) or word.startswith(MADE_AT_RUN_TIME)
                    or re.search(r"[<>{}*$]|\.\.\.", word)):
                continue
            file_part, _, test = word.partition("::")
            target = ROOT / file_part
            if not target.exists():
                problems.append(f"{path.name}: {word}: no such path")
            elif test and not re.search(rf"^\s*def {re.escape(test)}\(", target.read_text(), re.M):
                problems.append(f"{path.name}: {word}: no such test")
    return problems


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_leads_somewhere(path: Path) -> None:
    assert broken_links(path) == []


@pytest.mark.parametrize("path", REFERENCE, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_path_a_reference_page_names_exists(path: Path) -> None:
    assert missing_paths(path) == []


def test_a_broken_link_or_path_is_found(tmp_path: Path) -> None:
    twice = "## A `code` heading, twice\n\n"
    (tmp_path / "other.md").write_text(f"# Other page\n\n{twice}{twice}")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n[ok](other.md) [ok](other.md#other-page) [ok](other.md#a-code-heading-twice-1)\n"
        "[ok](#page) [web](https://example.com/x.md)\n"
        "[gone](missing.md) [no heading](other.md#nowhere) [here](#nothing)\n"
        "```bash\n[in code](also-missing.md)\n```\n"
        "`stream/worker/loop.py` `stream/worker/nothing.py` "
        "`tests/test_docs.py::test_a_broken_link_or_path_is_found` `tests/test_docs.py::test_gone`\n"
    )
    assert broken_links(page) == [
        "page.md: missing.md: no such file",
        "page.md: other.md#nowhere: no such heading in other.md",
        "page.md: #nothing: no such heading in page.md",
    ]
    assert missing_paths(page) == [
        "page.md: stream/worker/nothing.py: no such path",
        "page.md: tests/test_docs.py::test_gone: no such test",
    ]


# --- docs/worker.md's flags table against the parser -------------------------------------------

def _worker_parser(monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    from kvrec.stream.cli import build_parser

    for name in [n for n in __import__("os").environ if n.startswith("KVREC_")]:
        monkeypatch.delenv(name)  # the defaults themselves, not this machine's settings
    parser = build_parser(["worker"])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["worker"]


def _documented_flags() -> dict[str, tuple[str, str]]:
    """docs/worker.md's "Flags" section: the first option of each row -> (variable, default)."""
    text = (ROOT / "docs" / "worker.md").read_text()
    section = text.split("\n## Flags\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (`-.*?) \| `(KVREC_[A-Z0-9_]+)` \| (.*?) \| .* \|$", section, re.M)
    table = {}
    for options, variable, default in rows:
        for option in re.findall(r"`(--[a-z0-9-]+)`", options)[:1]:
            table[option] = (variable, default)
    return table


def _shown(action: argparse.Action) -> str | None:
    """The default as the table gives it; None where the table explains it in words (no
    default, one computed at start, or a secret)."""
    if action.default is None or action.dest in ("instance_id", "pod_name", "sasl_password",
                                                         "kafka_options"):
        return None
    if isinstance(action.default, bool):
        return "on" if action.default else "off"
    return str(action.default)


def test_the_worker_flags_table_is_the_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = _worker_parser(monkeypatch)
    documented = _documented_flags()
    actions = {a.option_strings[-1] if a.option_strings[0] == "-X" else a.option_strings[0]: a
               for a in parser._actions if a.option_strings and a.dest != "help"}
    assert set(documented) == set(actions), set(documented) ^ set(actions)
    for option, action in actions.items():
        variable, default = documented[option]
        assert f"env {variable})" in (action.help or ""), option
        shown = _shown(action)
        if shown is not None:
            assert default == shown, option
