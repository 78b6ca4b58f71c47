"""docs/CLI.md is what tests/cli/render_docs.py prints today.

The page pastes real command output; a change to a command's output, or to the page's
template, must come with a regenerated page. Ids, times and numbers differ on every run
(moto's random ids, the wall clock), so both sides are compared with those masked and
column padding collapsed: the words, labels, fields and their order must match.
"""

from __future__ import annotations

import re

import pytest

from tests.cli import render_docs

# Most specific first: ids contain digits, and every digit is masked last.
_VOLATILE = [
    (re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b"), "<uuid>"),
    (re.compile(r"\b[0-9a-f]{32}\b"), "<hex>"),
    (re.compile(r"\bi-[0-9a-f]{8,17}\b"), "<instance>"),
    (re.compile(r"\bsubnet-[0-9a-f]{8,17}\b"), "<subnet>"),
    (re.compile(r"\bjob-[0-9a-f]{10}\b"), "<job>"),
    (re.compile(r"\bresnet50-[0-9a-f]{6}\b"), "<job>"),
    (re.compile(r"\d+"), "0"),
    (re.compile(r"─+"), "─"),
    (re.compile(r"[ \t]+"), " "),
]


def normalised(text: str) -> str:
    for pattern, replacement in _VOLATILE:
        text = pattern.sub(replacement, text)
    return "\n".join(line.rstrip() for line in text.splitlines())


def test_normalised_keeps_words_and_masks_what_varies() -> None:
    one = "  0   i-0123456789abcdef0   m5.large  $0.0754   2h02m\n ──────"
    other = "  0   i-fedcba98765432100   m5.large   $0.1111   11h59m\n ───"
    assert normalised(one) == normalised(other)
    assert normalised("recovery 25s, overlap 1m35s") != normalised("recovery 25s, boot 1m35s")


@pytest.mark.slow  # runs every command of the page against a fresh moto stack
def test_docs_cli_md_is_what_the_renderer_produces(monkeypatch: pytest.MonkeyPatch) -> None:
    # No Docker daemon, whatever this machine has: the page shows what a user without one sees.
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/trainctl-docs/docker.sock")
    generated = render_docs.generate()
    page = render_docs.DOC.read_text()
    assert normalised(generated) == normalised(page), (
        "docs/CLI.md is stale: regenerate it with `.venv/bin/python -m tests.cli.render_docs`"
    )
