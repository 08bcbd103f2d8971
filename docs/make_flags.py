"""Regenerate docs/flags.md from the CLI's own parser: `python docs/make_flags.py > docs/flags.md`.

tests/test_docs.py checks that the committed file matches, so the doc cannot drift from the code.
"""

from __future__ import annotations

import argparse

from impasto.cli import build_parser


def flags_markdown() -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    lines = ["# Command-line options", "", "Generated from the parser by `docs/make_flags.py`; "
             "`impasto <command> --help` shows the same.", ""]
    for name, command in sub.choices.items():
        lines += [f"## impasto {name}", "", command.description or "", "",
                  "| option | default | what it does |", "|---|---|---|"]
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            names = ", ".join(f"`{o}`" for o in action.option_strings) or f"`{action.dest}`"
            default = "" if action.default in (None, False, argparse.SUPPRESS) else f"`{action.default}`"
            if isinstance(action.default, list):
                default = f"`{','.join(map(str, action.default))}`"
            text = (action.help or "").replace("%(default)s", str(action.default)).replace("%%", "%")
            if action.choices:
                text = f"{text} Choices: {', '.join(map(str, action.choices))}.".strip()
            lines.append(f"| {names} | {default} | {text.replace('|', '/')} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(flags_markdown())
