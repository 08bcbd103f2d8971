"""Regenerate docs/flags.md from the CLI's own parser: `python docs/make_flags.py > docs/flags.md`.

tests/test_docs.py checks that the committed file matches, so the doc cannot drift from the code.
"""

from __future__ import annotations

import argparse
import re

from impasto.cli import build_parser


def flags_markdown() -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    lines = ["# Command-line options", "", "Generated from the parser by `docs/make_flags.py`; "
             "`impasto <command> --help` shows the same.", ""]
    summaries = {a.dest: a.help for a in sub._choices_actions}
    for name, command in sub.choices.items():
        summary = summaries.get(name) or ""
        lines += [f"## impasto {name}", "", command.description or f"{summary[:1].upper()}{summary[1:]}.", "",
                  "| option | default | what it does |", "|---|---|---|"]
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            names = ", ".join(f"`{o}`" for o in action.option_strings) or f"`{action.dest}`"
            value = ",".join(map(str, action.default)) if isinstance(action.default, list) else str(action.default)
            switch = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                                         argparse._StoreConstAction))  # a switch: its default is "not given"
            unset = action.default is None or action.default is argparse.SUPPRESS or switch
            default = "" if unset else f"`{value}`"
            text = (action.help or "").replace("%(default)s", value).replace("%%", "%")
            given = re.search(r"\s*\(default ([^()]*)\)$", text)  # train's defaults live in its help text
            if given and not default:
                default, text = f"`{given.group(1)}`", text[:given.start()]
            if action.choices:
                text = f"{text} Choices: {', '.join(map(str, action.choices))}.".strip()
            lines.append(f"| {names} | {default} | {text.replace('|', '/')} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(flags_markdown())
