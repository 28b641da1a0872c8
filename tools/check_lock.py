"""Is requirements.lock complete on every platform learners use? Resolve it as each one would and compare.

For each target platform, uv resolves requirements.in against PyPI with the lock as constraints, evaluating
environment markers for that platform (pip's --platform cannot: it evaluates markers for the host). The
resolved set must be exactly the lock's lines whose markers hold there: a package the platform needs and the
lock lacks, or a pin the platform cannot use, fails with its name. This machine's pip configuration (local
wheels, extra indexes) is ignored. Needs PyPI; about a minute on a cold cache.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from packaging.markers import Marker
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
UV = Path(sys.executable).with_name("uv")


def _env(sys_platform, machine, system, os_name, full_version):
    return {"sys_platform": sys_platform, "platform_machine": machine, "platform_system": system,
            "os_name": os_name, "python_full_version": full_version, "python_version": "3.11",
            "implementation_name": "cpython", "platform_python_implementation": "CPython",
            "platform_release": "", "platform_version": "", "implementation_version": full_version}


# (uv's name for the platform, the marker environment it stands for, extra environment for uv)
TARGETS = [
    ("x86_64-manylinux_2_28", _env("linux", "x86_64", "Linux", "posix", "3.11.9"), {}),
    ("x86_64-manylinux_2_28", _env("linux", "x86_64", "Linux", "posix", "3.11.2"), {}),   # Debian 12's Python
    ("aarch64-manylinux_2_28", _env("linux", "aarch64", "Linux", "posix", "3.11.9"), {}),
    ("aarch64-apple-darwin", _env("darwin", "arm64", "Darwin", "posix", "3.11.9"), {"MACOSX_DEPLOYMENT_TARGET": "14.0"}),
    ("x86_64-pc-windows-msvc", _env("win32", "AMD64", "Windows", "nt", "3.11.9"), {}),
]


def lock_lines(lock: Path) -> list[tuple[str, str, str | None]]:
    """(name, version, marker or None) for each requirement line of a uv-style lock."""
    out = []
    for line in lock.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)\s*(?:;\s*(.+))?$", line.strip())
        if match:
            out.append((canonicalize_name(match[1]), match[2], match[3]))
    return out


def expected(lock: Path, env: dict) -> dict[str, str]:
    return {name: version for name, version, marker in lock_lines(lock) if marker is None or Marker(marker).evaluate(env)}


def resolve(platform: str, env: dict, extra_env: dict) -> dict[str, str]:
    run_env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "UV_"))} | extra_env
    out = subprocess.run([str(UV), "pip", "compile", str(ROOT / "requirements.in"), "-c", str(ROOT / "requirements.lock"),
                          "--python-platform", platform, "--python-version", env["python_full_version"],
                          "--no-header", "--no-annotate", "--no-config", "--index-url", "https://pypi.org/simple"],
                         capture_output=True, text=True, env=run_env)
    if out.returncode != 0:
        raise SystemExit(f"error: {platform} (Python {env['python_full_version']}) does not resolve with the lock: "
                         + " ".join(out.stderr.split())[:600])
    return {canonicalize_name(m[1]): m[2] for m in re.finditer(r"^([A-Za-z0-9_.\-]+)==(\S+)", out.stdout, re.M)}


def main() -> int:
    failed = False
    for platform, env, extra in TARGETS:
        want, got = expected(ROOT / "requirements.lock", env), resolve(platform, env, extra)
        missing = sorted(f"{n}=={v}" for n, v in got.items() if want.get(n) != v)
        unused = sorted(n for n in want if n not in got)
        label = f"{platform} (Python {env['python_full_version']})"
        if missing or unused:
            failed = True
            print(f"FAIL {label}: needs but the lock lacks {missing or 'nothing'}; locked but not needed {unused or 'nothing'}")
        else:
            print(f"ok   {label}: {len(got)} packages, all in the lock")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
