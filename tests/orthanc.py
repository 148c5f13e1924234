"""A REAL Orthanc PACS with the DICOMweb plugin for the PACS round-trip tests (Debian packages `orthanc`
and `orthanc-dicomweb`, installed by `make tools`).

Our own `Orthanc` process with our own configuration in a temporary folder, whatever the Debian
package's service does: HTTP on a free port of 127.0.0.1 only, no DICOM (DIMSE) server, storage and
index in the folder, HTTP basic authentication on (so the gateway's credentials are exercised), the
DICOMweb plugin and nothing else. The kernel stops it when the test process goes, however it goes
(`PR_SET_PDEATHSIG`, `headct.local.triton.parent_death_signal`)."""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from headct.local.triton import free_port, parent_death_signal

USERNAME = "headct-gateway"
PASSWORD = "pacs-secret-for-tests"
#: Where the Debian package puts the plugin (`dpkg -L orthanc-dicomweb`).
PLUGIN_DIRS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc"))
PLUGIN_GLOB = "libOrthancDicomWeb.so*"
INSTALL_HINT = "run `make tools` as root, or `apt-get install -y orthanc orthanc-dicomweb`"


def orthanc_binary() -> Path:
    found = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/bin")
    if found is None:
        raise FileNotFoundError(f"the Orthanc binary (Debian package orthanc) is missing: {INSTALL_HINT}")
    return Path(found)


def dicomweb_plugin() -> Path:
    """The DICOMweb plugin's shared library: from `dpkg -L orthanc-dicomweb`, else the usual folders."""
    candidates: list[Path] = []
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        listed = subprocess.run(
            ["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True, timeout=30, check=False
        ).stdout.split()
        candidates += [Path(line) for line in listed if Path(line).match(PLUGIN_GLOB)]
    for folder in PLUGIN_DIRS:
        candidates += sorted(folder.glob(PLUGIN_GLOB))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"the Orthanc DICOMweb plugin (orthanc-dicomweb) is missing: {INSTALL_HINT}")


@dataclass
class LocalOrthanc:
    """One Orthanc process on 127.0.0.1:`http_port`, its state under `home`."""

    home: Path
    http_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def log_path(self) -> Path:
        return self.home / "orthanc.log"

    def configuration(self) -> dict[str, object]:
        return {
            "Name": "HEADCT-TEST-PACS",
            "StorageDirectory": str(self.home / "storage"),
            "IndexDirectory": str(self.home / "index"),
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,  # 127.0.0.1 only
            "AuthenticationEnabled": True,
            "RegisteredUsers": {USERNAME: PASSWORD},
            "DicomServerEnabled": False,
            "DicomPort": free_port(),  # unused (no DIMSE server), but never the default 4242
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
            "HttpCompressionEnabled": False,
            "SaveJobs": False,
            "LuaScripts": [],
            "Plugins": [str(dicomweb_plugin())],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
        }

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        config = self.home / "orthanc.json"
        config.write_text(json.dumps(self.configuration(), indent=2))
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [str(orthanc_binary()), str(config)],
                cwd=self.home,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=parent_death_signal(),
            )

    def _get(self, path: str, timeout_s: float = 2.0) -> int:
        token = base64.b64encode(f"{USERNAME}:{PASSWORD}".encode()).decode()
        request = urllib.request.Request(self.url + path, headers={"Authorization": f"Basic {token}"})
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return int(response.status)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Until /system answers and the DICOMweb plugin serves QIDO-RS, or raise with the log's tail."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}\n{self.log_tail()}")
            with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError):
                if self._get("/system") == 200 and self._get("/dicom-web/studies") in (200, 204):
                    return
            time.sleep(0.2)
        raise TimeoutError(f"Orthanc not ready after {timeout_s:.0f} s\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.is_file():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@contextlib.contextmanager
def running_orthanc(home: Path, *, ready_timeout_s: float = 60.0) -> Iterator[LocalOrthanc]:
    """A ready Orthanc for the `with` block; stopped after it."""
    server = LocalOrthanc(home)
    server.start()
    try:
        server.wait_ready(ready_timeout_s)
        yield server
    finally:
        server.stop()
