"""An ollama Modelfile beside a GGUF export: the chat template in ollama's Go template language, and its stop.

ollama does not run a GGUF's Jinja chat template: it picks the known template closest to it and, for one unlike
any it knows (ours), falls back to the bare prompt, so a chat would reach the model without its role markers. The
Modelfile states the template and the end-of-turn stop itself. By hand, because nothing converts Jinja to Go
templates; only for the two templates this package ships (pipeline/templates), each checked against the Jinja
rendering with Go's own text/template in tests/test_export.py.
"""

from __future__ import annotations

from pathlib import Path

TEMPLATES_DIR = Path(__file__).parent / "templates"

# ollama renders these with .Messages (each .Role and .Content). BOS stands for the begin-of-text token where the
# GGUF leaves it to the template (add_bos false: the byte-level vocabularies); where llama.cpp adds it, nothing.
GO_TEMPLATES = {
    # chatml.jinja: every role as <|role|>, a space unless the text opens with one, the text, <|end|>; the reply
    # opens at <|assistant|> (`and` stops at an empty text, so slice never sees one)
    "chatml": ("BOS{{- range .Messages }}<|{{ .Role }}|>{{ if not (and .Content (eq (slice .Content 0 1) \" \")) }} "
               "{{ end }}{{ .Content }}<|end|>{{ end }}<|assistant|>"),
    # gemma.jinja: no system role; a system message's text opens the next user turn, as Google's template does
    # (an empty system text too: gemma.jinja writes its "\n\n" all the same)
    "gemma": ("BOS{{- $system := \"\" }}{{- $has_system := false }}{{- range .Messages }}"
              "{{- if eq .Role \"system\" }}{{- $system = .Content }}{{- $has_system = true }}"
              "{{- else if eq .Role \"user\" }}<start_of_turn>user\n"
              "{{ if $has_system }}{{ $system }}\n\n{{ end }}{{ $has_system = false }}{{ .Content }}<end_of_turn>\n"
              "{{ else }}<start_of_turn>model\n{{ .Content }}<end_of_turn>\n{{ end }}"
              "{{- end }}<start_of_turn>model\n"),
}


def known_template(chat_template: str | None) -> str | None:
    """Which of our templates `chat_template` is, by its text; None for any other."""
    for name in GO_TEMPLATES:
        if chat_template == (TEMPLATES_DIR / f"{name}.jinja").read_text():
            return name
    return None


def modelfile(gguf_file: str, chat_template: str | None, bos_token: str | None, template_adds_bos: bool,
              end_of_turn: str) -> str | None:
    """The Modelfile's text for `ollama create NAME -f Modelfile`, or None where the template is not ours.
    `template_adds_bos`: the GGUF leaves the begin-of-text token to the template (add_bos false)."""
    name = known_template(chat_template)
    if name is None:
        return None
    template = GO_TEMPLATES[name].replace("BOS", (bos_token or "") if template_adds_bos else "", 1)  # as Jinja
    return f'FROM ./{gguf_file}\nTEMPLATE """{template}"""\nPARAMETER stop "{end_of_turn}"\n'
