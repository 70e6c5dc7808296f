"""Every path the README and the docs cite exists: markdown links (with their #anchors) and
repository paths in backticks (``jaxdit/...``, ``tools/...``, ``experiments/...``, ...)."""
import glob
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.relpath(p, REPO)
                               for p in glob.glob(os.path.join(REPO, "docs", "*.md")))
LINK = re.compile(r"\]\(([^)\s]+)\)")
CODE_PATH = re.compile(r"`((?:jaxdit|tools|experiments|docs|tests)/[A-Za-z0-9_./-]+)")


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: str) -> set[str]:
    with open(path) as f:
        text = re.sub(r"```.*?```", "", f.read(), flags=re.S)  # '# comments' in code blocks
    return {github_anchor(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def cited(page: str):
    with open(os.path.join(REPO, page)) as f:
        text = f.read()
    for target in LINK.findall(text):
        if not re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            yield target
    for path in CODE_PATH.findall(text):
        if "<" not in path and "*" not in path:
            yield "/" + path.rstrip(".").split(":")[0]  # repo-relative; drop ':tiny'


@pytest.mark.parametrize("page", PAGES)
def test_every_cited_path_exists(page):
    base = os.path.dirname(os.path.join(REPO, page))
    missing = []
    for target in cited(page):
        path, _, anchor = target.partition("#")
        full = os.path.join(REPO, path[1:]) if path.startswith("/") else (
            os.path.join(base, path) if path else os.path.join(REPO, page))
        if not os.path.exists(full):
            missing.append(target)
        elif anchor and full.endswith(".md") and anchor not in anchors(full):
            missing.append(target)
    assert not missing, f"{page} cites what does not exist: {missing}"


def test_readme_stays_short():
    with open(os.path.join(REPO, "README.md")) as f:
        assert len(f.read().splitlines()) <= 170  # the rest belongs in docs/
