"""The documentation that is generated from code must match the code."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_flags_doc_matches_the_parser():
    spec = importlib.util.spec_from_file_location("make_flags", ROOT / "docs" / "make_flags.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    committed = (ROOT / "docs" / "flags.md").read_text()
    assert committed.strip() == module.flags_markdown().strip(), "run: python docs/make_flags.py > docs/flags.md"


def test_readme_commands_exist_in_makefile():
    makefile = (ROOT / "Makefile").read_text()
    readme = (ROOT / "README.md").read_text()
    for target in ("demo", "test"):
        assert f"make {target}" in readme
        assert f"\n{target}:" in makefile
    assert "make test" in (ROOT / ".ci" / "run").read_text()
