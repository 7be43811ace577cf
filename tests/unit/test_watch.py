"""Hot reload survives anything a file system or an operator can do to the config file."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

from click.testing import CliRunner

from tests.harness import ConfigMapMount, wait_until
from tollgate.cli.main import cli
from tollgate.config.watch import ConfigHolder, run_dir


def prefixed(path: Path, prefix: str) -> None:
    text = path.read_bytes().decode(errors="replace")
    start = text.index("header_prefix:")
    end = text.index("\n", start)
    path.write_text(text[:start] + f'header_prefix: "{prefix}"' + text[end:])


def rejected_then_recovers(holder: ConfigHolder, path: Path, expect: str) -> None:
    first = holder.current
    assert holder.check() is False
    assert holder.current is first and expect in (holder.last_error or "")
    assert holder.status["last_error"] == holder.last_error
    prefixed(path, "X-Next-")
    assert holder.check() is True
    assert holder.current.config.gateway.header_prefix == "X-Next-"
    assert holder.last_error is None


def test_invalid_utf8_edit(config_dir):
    path = config_dir / "gateway.yaml"
    holder = ConfigHolder(path)
    path.write_bytes(path.read_bytes() + b"# caf\xe9\n")
    rejected_then_recovers(holder, path, "not valid UTF-8")


def test_control_character_edit(config_dir):
    path = config_dir / "gateway.yaml"
    holder = ConfigHolder(path)
    path.write_bytes(path.read_bytes().replace(b"X-LangWatch-", b"X-Lang\x07Watch-", 1))
    line = path.read_bytes().split(b"\x07")[0].count(b"\n") + 1
    rejected_then_recovers(holder, path, f"gateway.yaml:{line}: control character U+0007")


def test_unreadable_file(config_dir):
    path = config_dir / "gateway.yaml"
    holder = ConfigHolder(path)
    good = path.read_text()
    path.unlink()
    path.mkdir()  # cannot be read as a file, even by root (for whom modes do not apply)
    assert holder.check() is False and "cannot read the file" in holder.last_error
    path.rmdir()
    path.write_text(good)
    prefixed(path, "X-Next-")
    assert holder.check() is True and holder.current.config.gateway.header_prefix == "X-Next-"


def test_deleted_then_recreated(config_dir):
    path = config_dir / "gateway.yaml"
    holder = ConfigHolder(path)
    good = path.read_text()
    path.unlink()
    assert holder.check() is False and "file not found" in holder.last_error
    path.write_text(good)
    prefixed(path, "X-Back-")
    assert holder.check() is True and holder.current.config.gateway.header_prefix == "X-Back-"


def test_configmap_symlink_swap(tmp_path, config_dir):
    """Kubernetes mounts a ConfigMap as `name -> ..data/name`, `..data -> ..<timestamp>`,
    and updates it by pointing `..data` at a new directory in one rename."""
    mount = tmp_path / "mount"
    first = mount / "..2026_11_29_10_00_00.1"
    first.mkdir(parents=True)
    for name in ("gateway.yaml", "prices.yaml"):
        shutil.copy(config_dir / name, first / name)
        (mount / name).symlink_to(Path("..data") / name)
    (mount / "..data").symlink_to(first.name)
    holder = ConfigHolder(mount / "gateway.yaml")
    second = mount / "..2026_11_29_10_05_00.2"
    shutil.copytree(first, second)
    prefixed(second / "gateway.yaml", "X-Swapped-")
    (mount / "..data_tmp").symlink_to(second.name)
    os.replace(mount / "..data_tmp", mount / "..data")
    shutil.rmtree(first)
    assert holder.check() is True
    assert holder.current.config.gateway.header_prefix == "X-Swapped-"


def test_failing_callbacks_do_not_stop_reloads(config_dir):
    path = config_dir / "gateway.yaml"
    holder = ConfigHolder(path)
    seen: list[str] = []

    def boom(*_args) -> None:
        raise RuntimeError("callback failed")

    holder.before_reload(boom)
    holder.on_reload(boom)
    holder.on_reload(lambda _old, new: seen.append(new.config.gateway.header_prefix))
    for prefix in ("X-One-", "X-Two-"):
        prefixed(path, prefix)
        assert holder.check() is True
    assert seen == ["X-One-", "X-Two-"]


def test_watcher_thread_outlives_an_unexpected_error(config_dir, monkeypatch):
    path = config_dir / "gateway.yaml"
    holder = ConfigHolder(path, interval=0.02)
    import tollgate.config.watch as watch

    real_load = watch.load_config
    calls = {"n": 0}

    def flaky(p):
        calls["n"] += 1
        if calls["n"] == 1:
            raise MemoryError("simulated")
        return real_load(p)

    monkeypatch.setattr(watch, "load_config", flaky)
    holder.start()
    try:
        prefixed(path, "X-First-")
        wait_until(lambda: holder.last_error and "MemoryError" in holder.last_error, timeout=5)
        prefixed(path, "X-Later-")
        wait_until(lambda: holder.current.config.gateway.header_prefix == "X-Later-", timeout=5)
        assert any(t.name == "tollgate-config" and t.is_alive() for t in threading.enumerate())
    finally:
        holder.stop()


def test_status_says_when_the_running_config_is_stale(config_dir):
    path = config_dir / "gateway.yaml"
    holder = ConfigHolder(path, interval=0.02)
    holder.start()
    runner = CliRunner()
    try:
        ok = runner.invoke(cli, ["--config", str(path), "status", "--format", "json"])
        assert ok.exit_code == 0, ok.output
        (me,) = json.loads(ok.output)["gateways"]
        assert me["pid"] == os.getpid() and me["stale"] is False
        path.write_bytes(path.read_bytes() + b"\xff\n")
        wait_until(lambda: holder.last_error is not None, timeout=5)
        stale = runner.invoke(cli, ["--config", str(path), "status"])
        assert stale.exit_code == 1
        assert "STALE" in stale.output and "not valid UTF-8" in stale.output
    finally:
        holder.stop()
    assert not list(run_dir(path).glob("*.json"))  # a stopped gateway leaves no report


def test_a_mounted_secret_key_file_follows_rotations(tmp_path, config_dir):
    """A provider key in a Kubernetes Secret volume: the config names the mount's link, and
    a rotation (the kubelet swapping `..data` and deleting the old folder) is read on the
    next request, without a reload."""
    from tollgate.providers.base import read_key_file

    secret = ConfigMapMount(tmp_path / "secret")
    secret.write({"OPENAI_API_KEY": "sk-first\n"})
    path = config_dir / "gateway.yaml"
    text = path.read_text().replace("api_key_env: OPENAI_API_KEY",
                                    f"api_key_file: {secret.path}/OPENAI_API_KEY", 1)
    path.write_text(text)
    provider = next(p for p in ConfigHolder(path).current.config.model_providers
                    if p.api_key_file)
    assert read_key_file(provider.id, provider.api_key_file) == "sk-first"
    secret.write({"OPENAI_API_KEY": "sk-rotated\n"})
    assert read_key_file(provider.id, provider.api_key_file) == "sk-rotated"


def test_a_file_caught_while_it_is_rewritten_is_not_loaded(config_dir):
    """A writer that truncates the file and writes it anew leaves it empty for a moment,
    and an empty file is a valid config with no keys: the watcher waits until the file
    holds still for a poll. Caught empty, then finished with a typo, the last good config
    (its keys included) keeps serving; a good rewrite is loaded a poll after it lands."""
    path = config_dir / "gateway.yaml"
    CliRunner().invoke(cli, ["--config", str(path), "virtual-keys", "create", "--name", "k",
                             "--scope", "ORG:acme"])
    holder = ConfigHolder(path)
    good = path.read_bytes()
    assert holder.current.config.virtual_keys
    path.write_bytes(b"")  # truncated, the new text not written yet
    assert holder.tick() is False
    path.write_bytes(good.replace(b"max_body_bytes:", b"max_body_byte:", 1))
    assert holder.tick() is False  # it moved again: not yet
    assert holder.tick() is False and "max_body_byte" in (holder.last_error or "")
    assert holder.current.config.virtual_keys  # never the empty file's
    path.write_bytes(good)
    prefixed(path, "X-Next-")  # the typo mended, and an edit
    assert holder.tick() is False  # just landed
    assert holder.tick() is True and holder.current.config.gateway.header_prefix == "X-Next-"
    assert holder.current.config.virtual_keys
