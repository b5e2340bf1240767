"""The docs document what the code does: the config reference is generated and in sync, the
README names the two commands CI relies on, and every local link in the docs resolves."""

import re
from pathlib import Path

from node.config import config_reference
from node.docs import render

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
CONFIGURATION = REPO / "docs" / "configuration.md"
REGENERATE = (
    "python -c \"from pathlib import Path; from node.docs import render; "
    "p = Path('docs/configuration.md'); p.write_text(render(p.read_text()))\""
)

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")


def _docs() -> list[Path]:
    return [README, *sorted((REPO / "docs").glob("*.md"))]


def _without_code(text: str) -> str:
    """``text`` with fenced code blocks and inline code removed, so code is not read as links."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def _anchors(path: Path) -> set[str]:
    """The heading anchors GitHub gives ``path``'s headings."""
    seen: dict[str, int] = {}
    anchors = set()
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    for line in text.splitlines():
        match = HEADING.match(line)
        if not match:
            continue
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", match.group(1))
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def test_config_reference_is_current():
    text = CONFIGURATION.read_text()
    assert render(text) == text, f"docs/configuration.md config reference is stale: run {REGENERATE}"
    assert config_reference().strip() in text


def test_readme_names_the_two_commands_and_ci_runs_the_test_command():
    text = README.read_text()
    assert "p2p-node swarm --peers 3" in text
    test_command = ".venv/bin/pip install -q -c constraints-cpu.txt -e '.[test]' && .venv/bin/python -m pytest -q"
    assert test_command in text
    assert test_command in (REPO / ".ci" / "run").read_text()


def test_readme_links_every_docs_page():
    text = README.read_text()
    for page in sorted((REPO / "docs").glob("*.md")):
        assert f"(docs/{page.name})" in text, f"README.md does not link docs/{page.name}"


def test_every_local_link_in_the_docs_resolves():
    broken = []
    for doc in _docs():
        for target in LINK.findall(_without_code(doc.read_text())):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):
                continue  # http:, https:, mailto:
            path, _, anchor = target.partition("#")
            resolved = (doc.parent / path).resolve() if path else doc
            if not resolved.exists():
                broken.append(f"{doc.relative_to(REPO)}: {target} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                broken.append(f"{doc.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)
