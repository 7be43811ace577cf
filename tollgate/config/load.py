"""Reading the YAML config: env interpolation, validation, errors that name file, line and field."""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.reader import ReaderError

from tollgate.catalog import ModelCatalog, load_catalog
from tollgate.config.fastyaml import read_data
from tollgate.config.problems import ConfigError, Problem
from tollgate.config.schema import Config, check_references
from tollgate.pricing import PriceTable, load_prices

if TYPE_CHECKING:
    from tollgate.derived import Derived

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass(frozen=True)
class LoadedConfig:
    config: Config
    prices: PriceTable
    path: Path
    catalog: ModelCatalog = field(default_factory=lambda: ModelCatalog({}))

    @functools.cached_property
    def derived(self) -> Derived:
        """What decisions derive from this config alone, kept while it is the current one."""
        from tollgate.derived import Derived

        return Derived(self)

    @functools.cached_property
    def known_models(self) -> frozenset[str]:
        """Every model name the operator wrote down (config, price table, catalog): the
        only ones metrics label series with, so clients cannot grow them."""
        cfg = self.config
        names = {*self.prices.names(), *self.catalog.models, *self.catalog.referenced(),
                 *self.catalog.snapshots()}
        names |= {m for p in cfg.model_providers for m in [*p.serves(), *p.prices]}
        for key in cfg.virtual_keys:
            names |= {*key.config.model_aliases, *key.config.model_aliases.values(),
                      *(key.models_allowed or [])}
        for policy in cfg.routing_policies:
            names |= {m for t in policy.targets() for pair in t.model_map.items() for m in pair}
        return frozenset(n for n in names if not any(c in n for c in "*?["))


def default_config_path() -> Path:
    return Path(os.environ.get("TOLLGATE_CONFIG") or "config/gateway.yaml")


def round_trip_yaml() -> YAML:
    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 4096
    yaml.indent(mapping=2, sequence=4, offset=2)
    return yaml


def read_yaml(path: Path) -> Any:
    """Round-trip load: keeps line numbers (and, for edits, comments, quotes and order)."""
    yaml = round_trip_yaml()
    try:
        text = path.read_bytes().decode("utf-8")
        return yaml.load(text)
    except FileNotFoundError:
        hint = ""
        if path == Path("config/gateway.yaml"):
            hint = (" (`make run` creates it from config/gateway.example.yaml; or `tollgate "
                    "init`, or --config PATH)")
        raise ConfigError([Problem(str(path), None, "", f"file not found{hint}")]) from None
    except OSError as e:  # unreadable: permissions, a directory, an I/O error
        raise ConfigError([Problem(str(path), None, "", f"cannot read the file: "
                                   f"{e.strerror or e}")]) from None
    except UnicodeDecodeError as e:
        line = e.object[: e.start].count(b"\n") + 1
        raise ConfigError([Problem(str(path), line, "", "not valid UTF-8 (byte "
                                   f"{e.object[e.start]:#04x} at offset {e.start})")]) from None
    except MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else None
        raise ConfigError([Problem(str(path), line, "", f"YAML syntax: {e.problem}")]) from None
    except ReaderError as e:  # a control character the YAML reader refuses
        line = text[: e.position].count("\n") + 1
        code = ord(e.character) if isinstance(e.character, str) else e.character
        raise ConfigError([Problem(str(path), line, "", f"control character U+{code:04X} is "
                                   "not allowed in YAML")]) from None
    except YAMLError as e:
        raise ConfigError([Problem(str(path), None, "", f"YAML: {e}")]) from None
    except (ValueError, IndexError, NotImplementedError) as e:  # the parser's own failures
        # (on a scalar like `+_`, on some comment placements)
        raise ConfigError([Problem(str(path), None, "", f"YAML: a value the parser cannot "
                                   f"read ({e.__class__.__name__}: {e})")]) from None


def line_of(doc: Any, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the node at `loc`, or of its nearest parent that exists."""
    node, line = doc, None
    for part in loc:
        try:
            if isinstance(node, CommentedMap) and part in node:
                pos = node.lc.key(part)
            elif isinstance(node, CommentedSeq) and isinstance(part, int) and part < len(node):
                pos = node.lc.item(part)
            else:
                break
        except KeyError:  # a node added by an edit in progress has no line yet
            break
        if pos is None:  # a node added by an edit in progress has no line yet
            break
        line, node = pos[0] + 1, node[part]
    return line


def field_name(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def expandable(loc: tuple[Any, ...]) -> bool:
    """Fields where `${VAR}` is expanded: endpoints and provider settings, which operators
    write. Names, principals and other values the CLI writes from user input stay literal,
    so a key named `${OPENAI_API_KEY}` can never print that variable."""
    if loc[:2] == ("gateway", "state") or loc[:3] == ("gateway", "telemetry", "otlp_endpoint"):
        return True
    return len(loc) >= 3 and loc[0] == "model_providers" and \
        loc[2] in ("base_url", "provider_config")


def _interpolate(node: Any, path: Path, doc: Any, loc: tuple[Any, ...],
                 problems: list[Problem]) -> Any:
    if isinstance(node, dict):
        return {k: _interpolate(v, path, doc, (*loc, k), problems) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, path, doc, (*loc, i), problems) for i, v in enumerate(node)]
    if isinstance(node, str) and "${" in node and expandable(loc):
        def sub(m: re.Match[str]) -> str:
            value = os.environ.get(m.group(1), m.group(2))
            if value is None:
                problems.append(Problem(str(path), line_of(doc, loc), field_name(loc),
                                        f"environment variable {m.group(1)} is not set"))
                return ""
            return value
        return _ENV_RE.sub(sub, node)
    return node


def load_config(path: Path | str) -> LoadedConfig:
    path = Path(path)
    try:
        return validate_document(read_data(path), path)
    except ConfigError:  # again from the round-trip parse, whose nodes know their lines
        return validate_document(read_yaml(path), path)


def validate_document(doc: Any, path: Path) -> LoadedConfig:
    """Validate a parsed YAML document as the config at `path` (prices resolve beside it)."""
    if doc is None:
        doc = CommentedMap()
    if not isinstance(doc, dict):
        raise ConfigError([Problem(str(path), 1, "", "the config must be a YAML mapping")])
    problems: list[Problem] = []
    data = _interpolate(doc, path, doc, (), problems)
    if problems:
        raise ConfigError(problems)
    try:
        config = Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError([
            Problem(str(path), line_of(doc, tuple(err["loc"])), field_name(tuple(err["loc"])),
                    _message(err))
            for err in e.errors()
        ]) from None
    for provider in config.model_providers:
        if provider.api_key_file:
            # Absolute, its symlinks kept: a mounted Secret's file points into a folder the
            # kubelet replaces on rotation, and each read must follow the link anew.
            provider.api_key_file = os.path.abspath(path.parent / provider.api_key_file)
    problems = [Problem(str(path), line_of(doc, loc), field_name(loc), msg)
                for loc, msg in check_references(config)]
    catalog = load_catalog((path.parent / config.gateway.models).resolve())
    prices = dataclasses.replace(load_prices((path.parent / config.gateway.prices).resolve()),
                                 snapshots=catalog.snapshots())
    problems += [Problem(str(path), line_of(doc, loc), field_name(loc), msg)
                 for loc, msg in prices.check_config(config)]
    if config.gateway.unpriced == "block":
        problems += [Problem(str(catalog.path), None, f"models.*.equivalents: {m}",
                             f"model {m!r} has no price in the price table")
                     for m in sorted(catalog.referenced()) if prices.lookup(m) is None]
    # A priced model can be served, and a request with no output cap can cost its ceiling.
    priced = {m: str(prices.path or path) for m in prices.names()} | {
        m: f"{path} (model_providers {p.id} prices)" for p in config.model_providers
        for m in p.prices}
    problems += [Problem(where, None, f"models: {m}",
                         f"model {m!r} has a price but no max_output_tokens in the model "
                         f"catalog ({catalog.path or 'models.yaml'}): add it there, so budgets "
                         "and TPM limits know what a request without an output cap can cost")
                 for m, where in sorted(priced.items()) if catalog.max_output_tokens(m) is None]
    if problems:
        raise ConfigError(problems)
    return LoadedConfig(config=config, prices=prices, path=path, catalog=catalog)


def _message(err: Any) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown field (check the spelling)"
    if err["type"] == "missing":
        return "required field is missing"
    return str(err["msg"])
