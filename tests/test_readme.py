"""The README's Python snippets run, each on its own (a reader copies one at a time)."""
import re
from pathlib import Path

import pytest

import fastbn

README = Path(__file__).resolve().parent.parent / "README.md"
SNIPPETS = re.findall(r"^```python\n(.*?)^```", README.read_text(), re.DOTALL | re.MULTILINE)


def test_the_readme_has_python_snippets():
    assert len(SNIPPETS) >= 2


@pytest.mark.parametrize("snippet", SNIPPETS, ids=lambda s: s.splitlines()[-1][:40])
def test_readme_snippet_runs_alone(snippet):
    """In a namespace of its own, so a snippet that uses another's names fails."""
    try:
        exec(compile(snippet, str(README), "exec"), {"__name__": "readme"})
    finally:  # the snippets change the global settings
        fastbn.set_num_threads(None)
        fastbn.set_backend(None)
