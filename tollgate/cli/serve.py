"""`tollgate serve ...` and `tollgate config validate`."""

from __future__ import annotations

import os
import sys

import click

from tollgate.cli.common import config_path
from tollgate.config.load import load_config
from tollgate.config.problems import ConfigError


def split_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise click.BadParameter(f"{value!r}: use HOST:PORT, e.g. 127.0.0.1:8080")
    return host.strip("[]") or "127.0.0.1", int(port)


def check_config(ctx: click.Context) -> str:
    path = config_path(ctx)
    try:
        load_config(path)
    except ConfigError as e:
        raise click.ClickException(f"config is invalid:\n{e}") from None
    return str(path.resolve())


@click.group()
def serve() -> None:
    """Run the gateway in a proxy."""


@serve.command(context_settings={"ignore_unknown_options": True})
@click.option("--listen", default="127.0.0.1:8080", show_default=True,
              help="Where clients connect (one port for both API families).")
@click.option("--ui", type=click.Choice(["none", "web"]), default="none", show_default=True,
              help="`web` runs mitmweb, showing each flow with the gateway's decision.")
@click.option("--web-listen", default="127.0.0.1:8081", show_default=True,
              help="mitmweb UI address (with --ui web).")
@click.argument("mitm_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def mitmproxy(ctx: click.Context, listen: str, ui: str, web_listen: str,
              mitm_args: tuple[str, ...]) -> None:
    """The mitmproxy host, for local debugging. Extra arguments go to mitmproxy."""
    from addon import SCRIPT

    path = check_config(ctx)
    host, port = split_listen(listen)
    # Reverse mode towards a placeholder: the addon sets every request's real destination,
    # and the lazy strategy means the placeholder is never dialled.
    args = [
        "--mode", f"reverse:http://127.0.0.1:9@{host}:{port}",
        "--set", "connection_strategy=lazy",
        "--set", f"tollgate_config={path}",
        "-s", str(SCRIPT),
        *mitm_args,
    ]
    from mitmproxy.tools import main as mitm_main

    if ui == "web":
        web_host, web_port = split_listen(web_listen)
        args += ["--web-host", web_host, "--web-port", str(web_port),
                 "--set", "web_open_browser=false"]
        mitm_main.mitmweb(args)
    else:
        mitm_main.mitmdump(args)


@click.group("config")
def config_group() -> None:
    """Check the config file."""


@config_group.command()
@click.pass_context
def validate(ctx: click.Context) -> None:
    """Validate the config and price table; exit 1 with file:line: field: problem."""
    path = config_path(ctx)
    try:
        loaded = load_config(path)
    except ConfigError as e:
        click.echo(str(e), err=True)
        sys.exit(1)
    cfg = loaded.config
    for p in cfg.model_providers:
        if p.api_key_env and not os.environ.get(p.api_key_env):
            click.echo(f"warning: model provider {p.id}: {p.api_key_env} is not set in this "
                       "environment", err=True)
    click.echo(f"{path}: ok ({len(cfg.model_providers)} model providers, "
               f"{len(cfg.routing_policies)} routing policies, {len(cfg.virtual_keys)} virtual "
               f"keys, {len(cfg.budgets)} budgets, {len(loaded.prices.models)} priced models)")
