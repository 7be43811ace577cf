"""`make image-check`: the Dockerfile's image, built without a Docker engine, serves.

The base image is made with `debootstrap` from Debian's archive (a minimal Debian of the
`FROM` line's release, with the packages its `apt-get install` names), the `COPY`s are
copied from this checkout, and every other `RUN` runs in it with `chroot`. Then the image's
`tollgate`, found on its `ENV PATH` and run as its `USER`, does what `make wheel-smoke`
checks of the wheel: `init`, a provider and a key, `config validate` with nothing to say of
OpenTelemetry (the Dockerfile's own second install), a chat completion through `serve
envoy` and its span at a collector.

Needs root, and Debian's archive (`debootstrap`, installed with apt if missing). Run with the
development environment's Python (it has the fake provider and the collector).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.wheel_smoke import KEY, run, serves  # noqa: E402

MIRROR = "http://deb.debian.org/debian"
# Where the image's own PATH starts (Docker's default for a Linux image).
IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MOUNTS = ("proc", "sys", "dev", "dev/pts")


def instructions(dockerfile: Path = ROOT / "Dockerfile") -> list[tuple[str, str]]:
    """A Dockerfile's instructions, in order (continuation lines joined, comments left
    out)."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [(word.upper(), rest.strip()) for word, _, rest in
            (line.partition(" ") for line in lines if line and not line.startswith("#"))]


def base(steps: list[tuple[str, str]]) -> tuple[str, list[str]]:
    """The Debian release of the `FROM` line and the packages its apt `RUN` installs."""
    [image] = [rest for word, rest in steps if word == "FROM"]
    found = re.fullmatch(r"debian:([a-z]+)-slim", image)
    if found is None:
        sys.exit(f"image check: {image} is not a Debian slim image; only those are replayed")
    [apt] = [rest for word, rest in steps if word == "RUN" and "apt-get install" in rest]
    words = apt.split("apt-get install", 1)[1].split("&&", 1)[0].split()
    return found.group(1), [w for w in words if not w.startswith("-")]


def main() -> int:
    if os.geteuid() != 0:
        sys.exit("image check: run as root (debootstrap and chroot)")
    if shutil.which("debootstrap") is None:
        run("apt-get", "update", "-qq")
        run("apt-get", "install", "-y", "-qq", "debootstrap")
    steps = instructions()
    release, packages = base(steps)
    work = Path(tempfile.mkdtemp(prefix="tollgate-image-"))
    image = work / "rootfs"
    mounted: list[Path] = []
    try:
        run("debootstrap", "--variant=minbase", f"--include={','.join(packages)}", release,
            image, MIRROR)
        print(f"image check: {release} with {', '.join(packages)}")
        for name in MOUNTS:
            run("mount", "--bind", f"/{name}", image / name)
            mounted.append(image / name)
        # The build machine's name resolution and trust (a build behind a proxy that
        # inspects TLS needs its certificate, as `docker build` on this machine would).
        shutil.copy("/etc/resolv.conf", image / "etc" / "resolv.conf")
        shutil.copy("/etc/ssl/certs/ca-certificates.crt",
                    image / "etc" / "ssl" / "certs" / "ca-certificates.crt")
        env = {"PATH": IMAGE_PATH}
        user = "0:0"
        for word, rest in steps:
            if word == "COPY":
                *sources, dest = rest.split()
                target = image / dest.lstrip("/")
                for source in sources:
                    into = target / source if dest.endswith("/") else target
                    into.parent.mkdir(parents=True, exist_ok=True)
                    if (ROOT / source).is_dir():
                        shutil.copytree(ROOT / source, into, ignore=shutil.ignore_patterns(
                            "__pycache__", "*.pyc"))
                    else:
                        shutil.copy(ROOT / source, into)
            elif word == "RUN" and "apt-get install" not in rest:
                run("chroot", image, "env", "-i", *(f"{k}={v}" for k, v in env.items()),
                    "/bin/sh", "-e", "-c", rest)
            elif word == "ENV":
                name, _, value = rest.partition("=")
                env[name] = value.replace(f"${name}", env.get(name, ""))
            elif word == "USER":
                user = rest
        print(f"image check: built; its tollgate runs as {user}")
        site = image / "tmp" / "site"
        site.mkdir(parents=True)
        uid, _, gid = user.partition(":")
        os.chown(site, int(uid), int(gid or uid))
        inside = " ".join(f"{k}={shlex.quote(v)}" for k, v in
                          {**env, "HOME": "/tmp", "SMOKE_OPENAI_KEY": KEY}.items())

        def tollgate(*args: str | Path) -> list[str | Path]:
            """The image's `tollgate`, from its PATH, as its user, in /tmp/site."""
            command = shlex.join(["tollgate", *map(str, args)])
            return ["chroot", f"--userspec={user}", image, "/bin/sh", "-c",
                    f"cd /tmp/site && exec env -i {inside} {command}"]

        serves(tollgate, site, Path("/tmp/site"), None, work / "gateway.log")
    except BaseException:
        print(f"image check: its files are kept in {work}", file=sys.stderr)
        raise
    finally:
        for path in reversed(mounted):
            subprocess.run(["umount", "--lazy", str(path)], check=False)
    shutil.rmtree(work)
    print("image check: ok (init, config validate, a request through Envoy, its span "
          "exported, from the image's tollgate as its user)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
