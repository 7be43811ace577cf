"""The `tollgate` command."""

from __future__ import annotations

import click

from tollgate.cli.explain import explain
from tollgate.cli.org import init, projects, teams
from tollgate.cli.providers import model_providers, routing_policies
from tollgate.cli.ratelimits import rate_limits
from tollgate.cli.serve import config_group, envoy_group, serve
from tollgate.cli.spend import gateway_budgets, spend
from tollgate.cli.status import status
from tollgate.cli.virtual_keys import virtual_keys


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tollgate-llm-gateway", prog_name="tollgate")
@click.option("--config", type=click.Path(dir_okay=False), envvar="TOLLGATE_CONFIG",
              help="Gateway config file  [default: $TOLLGATE_CONFIG, then config/gateway.yaml]")
def cli(config: str | None) -> None:
    """tollgate: governance for LLM traffic inside Envoy and mitmproxy."""


for command in (init, teams, projects, model_providers, routing_policies, virtual_keys,
                gateway_budgets, rate_limits, spend, config_group, serve, envoy_group, status,
                explain):
    cli.add_command(command)


def main() -> None:
    cli(prog_name="tollgate")
