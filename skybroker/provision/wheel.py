"""The wheel of the skybroker this broker runs, for a cloud replica to install.

skybroker is not on a package index, so a replica cannot `pip install skybroker==X`: the
SkyPilot Task mounts this wheel and installs it. It is rebuilt from the installed
distribution's own files (its RECORD), so the replica runs exactly the code the broker runs.
A source checkout (editable install) uploads its tree instead (see provision.skypilot).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata as md
import json
import zipfile
from pathlib import Path

from skybroker.provision import ProvisionError

DIST = "skybroker"
_SKIP_SUFFIXES = (".pyc",)
_SKIP_META = ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json")


def is_editable(dist: md.Distribution) -> bool:
    text = dist.read_text("direct_url.json")
    if not text:
        return False
    return bool(json.loads(text).get("dir_info", {}).get("editable"))


def _wheel_tag(dist: md.Distribution) -> str:
    for line in (dist.read_text("WHEEL") or "").splitlines():
        if line.startswith("Tag:"):
            return line.split(":", 1)[1].strip()
    return "py3-none-any"


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def wheel_name(dist: md.Distribution) -> str:
    name = dist.metadata["Name"].replace("-", "_")
    return f"{name}-{dist.version}-{_wheel_tag(dist)}.whl"


def build_installed_wheel(dest: Path, dist: md.Distribution | None = None) -> Path:
    """Write the wheel of the installed (non-editable) skybroker into `dest`; reused when the
    same version's wheel is there already. Raises ProvisionError when there is none to copy."""
    try:
        dist = dist or md.distribution(DIST)
    except md.PackageNotFoundError as e:
        raise ProvisionError(f"skybroker is not installed as a distribution ({e})") from e
    if is_editable(dist):
        raise ProvisionError("skybroker is an editable install: ship its source tree instead")
    files = [f for f in dist.files or [] if not str(f).startswith("..")]
    if not files:
        raise ProvisionError("the installed skybroker lists no files (no RECORD): reinstall it")
    info_dir = next(str(f).split("/")[0] for f in files if ".dist-info/" in str(f))
    out = Path(dest) / wheel_name(dist)
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    records = []
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(files, key=str):
            arc = str(f)
            if arc.endswith(_SKIP_SUFFIXES) or "/__pycache__/" in f"/{arc}":
                continue
            if arc.startswith(info_dir + "/") and arc.split("/", 1)[1] in _SKIP_META:
                continue
            data = Path(f.locate()).read_bytes()
            zf.writestr(arc, data)
            records.append(f"{arc},{_record_hash(data)},{len(data)}")
        records.append(f"{info_dir}/RECORD,,")
        zf.writestr(f"{info_dir}/RECORD", "\n".join(records) + "\n")
    tmp.replace(out)
    return out
