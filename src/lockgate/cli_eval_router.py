"""`lockgate eval-router`: a router model of a `--config` file against one of its models, offline.

    lockgate eval-router --config models.yaml --router auto --against big --price small=0.05 --price big=0.6

Prints a JSON report (eval/router_eval.py): each side's accuracy on the bundled question set,
how the router split the questions (by model and by rule), tokens per model and, with a
`--price` for every model involved (USD per million tokens), the cost; then the two side by
side on stderr. Exit 0, or 2 on bad input. Here, above `lifecycle/` and `eval/`, because it
reads the models config (lifecycle) and measures with eval's offline engine.
"""
from __future__ import annotations

import json
import math
from typing import Annotated, Optional

import typer


def parse_prices(values: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for v in values:
        name, sep, amount = v.partition("=")
        try:
            usd = float(amount)
        except ValueError:
            usd = -1.0
        if not sep or not name or not math.isfinite(usd) or not 0 <= usd <= 1e6:
            raise ValueError(f"--price {v!r}: expected MODEL=USD_PER_MILLION_TOKENS (0 to 1e6)")
        out[name] = usd
    return out


def eval_router_command(
    config: Annotated[str, typer.Option(help="The models config (YAML or JSON) holding the router and the models")],
    router: Annotated[str, typer.Option(help="The router model's name")],
    against: Annotated[str, typer.Option(help="A model of the config to compare with (a served name or NAME@VERSION)")],
    price: Annotated[Optional[list[str]], typer.Option(help="MODEL=USD per million tokens (repeatable)")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Use only the first N questions")] = None,
    num_threads: Annotated[Optional[int], typer.Option(help="CPU threads per model")] = None,
) -> None:
    """Route the bundled questions with a router model and answer them with the models it picks,
    then with one model: accuracy, tokens and cost side by side."""
    from lockgate.eval.data import load_questions  # here, not at import: `lockgate --help` stays fast
    from lockgate.eval.router_eval import Served, run
    from lockgate.lifecycle import models_config

    try:
        specs, _ = models_config.load(config)
        r = models_config.load_routers(config, specs).get(router)
        if r is None:
            raise ValueError(f"--router {router!r} is not a router of {config}")
        served: dict[str, Served] = {}
        for s in specs:
            one = Served(s.ref, s.path, dict(s.engine))
            for name in (s.name, *s.aliases):
                served.setdefault(name, one)  # the model's first version, as the server's default split
                served[f"{name}@{s.version}"] = one
        if against not in served:
            raise ValueError(f"--against {against!r} is not a model of {config}")
        prices = parse_prices(price or [])
        unknown = [n for n in prices if n not in served]
        if unknown:
            raise ValueError(f"--price names {unknown[0]!r}, not a model of {config}")
        if limit is not None and limit < 1:
            raise ValueError(f"--limit must be >= 1, got {limit}")
        questions = load_questions()[:limit]
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    report = run(r, against, served, questions, prices, num_threads)
    typer.echo(json.dumps(report, indent=2))
    a, b = report["router"], report["against"]
    typer.echo(f"{'':<12}{'accuracy':>10}{'tokens':>10}{'cost USD':>12}", err=True)
    for label, side in ((router, a), (against, b)):
        cost = "-" if side["cost_usd"] is None else f"{side['cost_usd']:.6f}"
        typer.echo(f"{label[:12]:<12}{side['accuracy']:>10.3f}{side['total_tokens']:>10}{cost:>12}", err=True)


def register(app: typer.Typer) -> None:
    app.command("eval-router")(eval_router_command)
