"""DICOM TLS: DCMTK storescu stores over TLS with self-signed certificates; plain clients are refused."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest
from ingest_support import (
    Db,
    ct_files,
    echoscu,
    free_port,
    make_phantom,
    make_settings,
    running_listener,
    storescu,
    upgrade,
)

pytestmark = pytest.mark.integration


def self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate and its key for CN=localhost, made with openssl."""
    key, cert = folder / f"{name}.key", folder / f"{name}.crt"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            f"/CN=localhost/O={name}",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return key, cert


def test_storescu_over_tls_is_stored_and_plain_client_is_refused_on_tls_port(
    tmp_path: Path, postgres_db_url: str, redis_url: str
) -> None:
    upgrade(postgres_db_url)
    server_key, server_cert = self_signed(tmp_path, "server")
    client_key, client_cert = self_signed(tmp_path, "client")
    [folder] = make_phantom(tmp_path / "phantom", slices=2, seed=3)
    files = ct_files(folder)
    settings = make_settings(
        tmp_path / "var",
        postgres_db_url,
        redis_url,
        tls_cert_path=server_cert,
        tls_key_path=server_key,
        tls_ca_path=client_cert,
        tls_port=free_port(),
    )
    db = Db(postgres_db_url)
    with running_listener(settings, run_assembler=False) as listener:
        assert listener.tls_port is not None
        # A client that connects and says nothing does not block others (handshake off the accept loop).
        with socket.create_connection(("127.0.0.1", listener.tls_port)):
            tls = storescu(
                listener.tls_port,
                files[:1],
                "+tls",
                str(client_key),
                str(client_cert),
                "+cf",
                str(server_cert),
                timeout=60,
            )
        assert tls.returncode == 0 and "Received Store Response (Success)" in tls.stdout + tls.stderr, (
            tls.stdout + tls.stderr
        )
        # Plain DICOM on the TLS port: no association, nothing stored.
        plain = storescu(listener.tls_port, files[1:], timeout=60)
        assert plain.returncode != 0 and "Received Store Response" not in plain.stdout + plain.stderr
        # TLS without a client certificate, when the listener requires one: refused.
        anonymous = storescu(listener.tls_port, files[1:], "+tla", "+cf", str(server_cert), timeout=60)
        assert anonymous.returncode != 0 and "Received Store Response" not in anonymous.stdout + anonymous.stderr
        # Still serving, on both ports.
        assert echoscu(listener.port).returncode == 0
        again = storescu(
            listener.tls_port, files[1:], "+tls", str(client_key), str(client_cert), "+cf", str(server_cert), timeout=60
        )
        assert again.returncode == 0, again.stdout + again.stderr
    [series] = db.series()
    assert series.num_instances == 2
    db.close()
