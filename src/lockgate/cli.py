"""`lockgate` command line: serve, generate, chat (admin commands, bench and eval register themselves)."""
from __future__ import annotations

import sys
import uuid
from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="lockgate: paged LLM engine, OpenAI-compatible server, multi-tenant gateway.")

ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="HF checkpoint dir or .gguf file; default: embedded SmolLM2-135M-Instruct")]

QuantOpt = Annotated[Optional[str], typer.Option(help="int4 (the GGUF's 4-bit blocks) or int8: weight-only, less memory for CPU decode")]


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="text to complete")],
    model: ModelOpt = None,
    max_tokens: Annotated[int, typer.Option(help="tokens to generate")] = 64,
    temperature: Annotated[float, typer.Option(help="0 for greedy")] = 0.0,
    top_p: Annotated[float, typer.Option()] = 1.0,
    seed: Annotated[Optional[int], typer.Option()] = None,
    chat: Annotated[bool, typer.Option("--chat", help="wrap the prompt in the chat template")] = False,
    dtype: Annotated[str, typer.Option(help="auto | float32 | bfloat16 | float16")] = "auto",
    quantization: QuantOpt = None,
) -> None:
    """Print the model's completion of PROMPT."""
    from lockgate import LLM, SamplingParams

    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
        llm = LLM(model, dtype=dtype, quantization=quantization)
        if chat:
            out = llm.chat([{"role": "user", "content": prompt}], params)
        else:
            out = llm.generate(prompt, params)
    except ValueError as e:
        _fail(str(e))
    typer.echo(out[0].outputs[0].text)


@app.command()
def chat(
    model: ModelOpt = None,
    max_tokens: Annotated[int, typer.Option(help="tokens per reply")] = 256,
    temperature: Annotated[float, typer.Option()] = 0.7,
    system: Annotated[Optional[str], typer.Option(help="system prompt")] = None,
    dtype: Annotated[str, typer.Option()] = "auto",
    quantization: QuantOpt = None,
) -> None:
    """Interactive chat that streams the reply. /reset clears the history, /exit quits."""
    from lockgate.engine.config import EngineConfig
    from lockgate.engine.llm_engine import LLMEngine
    from lockgate.engine.sampling_params import SamplingParams

    try:
        engine = LLMEngine(EngineConfig(model=model, dtype=dtype, quantization=quantization))
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature)
    except ValueError as e:
        _fail(str(e))
    base = [{"role": "system", "content": system}] if system else []
    history = list(base)
    typer.secho("lockgate chat — /reset clears the history, /exit or Ctrl-D quits", dim=True)
    while True:
        try:
            line = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            typer.echo()
            return
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history = list(base)
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        tok = engine.tokenizer
        try:
            ids = tok.encode(tok.apply_chat_template(history, add_generation_prompt=True), add_special_tokens=False)
            rid = uuid.uuid4().hex
            engine.add_request(rid, ids, params)
        except ValueError as e:
            typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
            history.pop()
            continue
        reply = ""
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    delta = out.outputs[0].delta_text
                    reply += delta
                    sys.stdout.write(delta)
                    sys.stdout.flush()
        except KeyboardInterrupt:  # stop this reply, keep the session
            engine.abort_request(rid)
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": reply})


from lockgate.server.launch import ServeCommand, serve_command  # noqa: E402  (after the app exists)

app.command("serve", cls=ServeCommand)(serve_command)  # ServeCommand: a bare --ray means --ray local
from lockgate.cli_admin import register as _register_admin  # noqa: E402

_register_admin(app)  # tenants | keys | usage | audit
from lockgate.cli_alerts import register as _register_alerts  # noqa: E402

_register_alerts(app)  # alerts secret | list
from lockgate.cli_schemas import register as _register_schemas  # noqa: E402

_register_schemas(app)  # schemas register | list | show
from lockgate.bench.cli import register as _register_bench  # noqa: E402

_register_bench(app)  # bench
from lockgate.eval.cli import register as _register_eval  # noqa: E402

_register_eval(app)  # eval
from lockgate.cli_eval_router import register as _register_eval_router  # noqa: E402

_register_eval_router(app)  # eval-router
from lockgate.cli_autoscale import register as _register_autoscale  # noqa: E402

_register_autoscale(app)  # autoscale simulate | plan


def main() -> None:
    app()


if __name__ == "__main__":
    main()
