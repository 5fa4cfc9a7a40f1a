"""`default_parser_for`: the tool-call parser a chat template asks for (`--tool-call-parser auto`)."""
from __future__ import annotations


def default_parser_for(chat_template: str | None, model_type: str | None = None) -> str | None:
    """`hermes` for templates that wrap calls in `<tool_call>` (Hermes 2/3, Qwen2.5, Qwen3);
    `llama3_json` for Llama 3.x's (`<|python_tag|>`, or the `"parameters"` JSON instruction in a
    Llama-3 header format, or a llama model whose template has the `ipython` role); else None."""
    template = chat_template if isinstance(chat_template, str) else ""
    if "<tool_call>" in template:
        return "hermes"
    if "<|python_tag|>" in template:
        return "llama3_json"
    llama_headers = "<|start_header_id|>" in template
    if llama_headers and '"parameters"' in template:
        return "llama3_json"
    if model_type == "llama" and llama_headers and "ipython" in template:
        return "llama3_json"
    return None
