"""A renderer for the Go-template subset of the study's Ollama Modelfiles, for the tests only: it checks
that a Modelfile's TEMPLATE renders exactly the prompt the model was trained on (Ollama itself cannot
run here). Kept out of the package: production code has no use for rendering its own output."""

from __future__ import annotations

import re

_GO_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)


def render_go_template(template: str, values: dict, *, generation: bool = True) -> str:
    """Render the Go-template subset the Modelfiles here use: ``{{ .Name }}``, ``{{ if .Name }}``,
    ``{{ else }}``, ``{{ end }}`` and ``{{-``/``-}}`` trimming. Missing or empty values are false.

    ``generation=True`` does what Ollama does for the turn being generated: everything from
    ``{{ .Response }}`` on is dropped. Any other action raises, so a template outside the subset
    cannot pass a check by accident.
    """
    tokens, pos = [], 0
    for m in _GO_ACTION.finditer(template):
        tokens.append(("text", template[pos:m.start()]))
        tokens.append(("action", m.group(2), m.group(1) == "-", m.group(3) == "-"))
        pos = m.end()
    tokens.append(("text", template[pos:]))
    for i, tok in enumerate(tokens):  # Go trims all whitespace next to a "{{-" or "-}}" marker
        if tok[0] == "action":
            if tok[2] and tokens[i - 1][0] == "text":
                tokens[i - 1] = ("text", tokens[i - 1][1].rstrip(" \t\r\n"))
            if tok[3] and tokens[i + 1][0] == "text":
                tokens[i + 1] = ("text", tokens[i + 1][1].lstrip(" \t\r\n"))
    out, stack = [], []  # stack of (branch taken, in else) for nested ifs

    def active() -> bool:
        return all(taken != in_else for taken, in_else in stack)

    for tok in tokens:
        if tok[0] == "text":
            if active():
                out.append(tok[1])
            continue
        action = tok[1]
        if m := re.fullmatch(r"if \.(\w+)", action):
            stack.append((bool(values.get(m[1])), False))
        elif action == "else":
            if not stack or stack[-1][1]:
                raise ValueError("{{ else }} without an open {{ if }}")
            stack[-1] = (stack[-1][0], True)
        elif action == "end":
            if not stack:
                raise ValueError("{{ end }} without an open {{ if }}")
            stack.pop()
        elif m := re.fullmatch(r"\.(\w+)", action):
            if m[1] == "Response" and generation:
                break
            if active():
                out.append(str(values.get(m[1]) or ""))
        else:
            raise ValueError(f"Go template action {{{{ {action} }}}} is outside the supported subset")
    return "".join(out)
