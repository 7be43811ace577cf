"""`tollgate explain`: the decision the config would take for a request, without sending it."""

from __future__ import annotations

import asyncio
import json
import sys

import click

from tollgate.cli.common import config_path
from tollgate.config.problems import ConfigError
from tollgate.store import StoreUnavailable


@click.command()
@click.argument("body", type=click.File("rb"), default="-")
@click.option("--path", default="/v1/chat/completions", show_default=True,
              help="The route, as the client calls it (/v1/messages, /v1/responses, ...).")
@click.option("--method", default="POST", show_default=True)
@click.option("--key", "key_id", metavar="ID", help="Decide as this virtual key.")
@click.option("--secret", envvar="TOLLGATE_VK", metavar="SECRET",
              help="Or as the key with this secret (as the client sends it)  "
                   "[default: $TOLLGATE_VK]")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text",
              show_default=True)
@click.pass_context
def explain(ctx: click.Context, body: click.utils.LazyFile, path: str, method: str,
            key_id: str | None, secret: str | None, fmt: str) -> None:
    """Explain the decision the config would take for BODY (a JSON file, or stdin): the key
    and scope, the model after aliases, each policy rule and its candidates, the routing
    plan, the price and worst case held, each budget and rate limit and whether it admits,
    shadow decisions, and the headers that would go upstream (credentials masked). Nothing
    is sent and nothing is counted. Exits 1 when the request would be refused."""
    from tollgate.explain import as_text
    from tollgate.explain import explain as run

    if key_id is None and secret is None:
        raise click.UsageError("say which key: --key ID, or --secret (or $TOLLGATE_VK)")
    raw = body.read()
    try:
        report = asyncio.run(run(config_path(ctx), method.upper(), path, raw,
                                 key_id=key_id, secret=None if key_id else secret))
    except ConfigError as e:
        raise click.ClickException(f"config is invalid:\n{e}") from None
    except LookupError as e:
        raise click.ClickException(str(e)) from None
    except StoreUnavailable as e:
        raise click.ClickException(f"state store unavailable: {e}") from None
    click.echo(json.dumps(report, indent=2, default=str) if fmt == "json" else as_text(report))
    sys.exit(1 if report["decision"]["action"] == "refuse" else 0)
