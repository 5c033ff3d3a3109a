"""DICOM over TLS (PS3.15 B.1), both ways, with real peers: kaapcli <-> kaapcli, DCMTK (storescu/echoscu/storescp
+tls) and Orthanc (DicomTlsEnabled).  The certificates are made by the test (Python's ``cryptography``): a CA, a
server certificate for 127.0.0.1/localhost, a client certificate, and a rogue CA the peers do not trust."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import dcmtk, dicom_files, free_port, kaapcli
from peers import MOVE_AET, ORTHANC, Orthanc, receiver, run_orthanc, stop, wait_port  # noqa: F401 - pytest fixture

pytestmark = pytest.mark.network


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    name_only_cert: Path  # a server certificate for "localhost" only (no IP address)
    name_only_key: Path
    rogue_ca: Path

    def server(self) -> list[str]:
        return ["--tls", "--tls-cert", str(self.server_cert), "--tls-key", str(self.server_key), "--tls-ca",
                str(self.ca)]

    def client(self) -> list[str]:
        return ["--tls", "--tls-ca", str(self.ca), "--tls-cert", str(self.client_cert), "--tls-key",
                str(self.client_key)]


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    root = tmp_path_factory.mktemp("pki")
    now = datetime.datetime.now(datetime.UTC)

    def key() -> rsa.RSAPrivateKey:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def write_key(path: Path, private: rsa.RSAPrivateKey) -> Path:
        path.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return path

    def certificate(path: Path, cn: str, public: rsa.RSAPrivateKey, issuer: tuple[x509.Name, rsa.RSAPrivateKey] | None,
                    names: list[x509.GeneralName] | None = None) -> tuple[x509.Name, rsa.RSAPrivateKey]:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        issuer_name, signer = issuer or (subject, public)
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name)
                   .public_key(public.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=30))
                   .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True))
        if issuer is None:
            builder = builder.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False),
                                            critical=True)
        else:
            builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                                   ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        path.write_bytes(builder.sign(signer, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
        return subject, public

    ca_key, rogue_key = key(), key()
    ca = certificate(root / "ca.pem", "kaapcli test CA", ca_key, None)
    certificate(root / "rogue-ca.pem", "rogue CA", rogue_key, None)
    local = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server_key, client_key, name_key = key(), key(), key()
    certificate(root / "server.pem", "kaapcli test server", server_key, ca, local)
    certificate(root / "client.pem", "kaapcli test client", client_key, ca, [x509.DNSName("client.example")])
    certificate(root / "name-only.pem", "localhost", name_key, ca, [x509.DNSName("localhost")])
    return Pki(root / "ca.pem", root / "server.pem", write_key(root / "server.key", server_key),
               root / "client.pem", write_key(root / "client.key", client_key), root / "name-only.pem",
               write_key(root / "name-only.key", name_key), root / "rogue-ca.pem")


# --------------------------------------------------------------------------- kaapcli <-> kaapcli

def test_kaapcli_to_kaapcli_mutual_tls(receiver, pki: Pki, mock_ct: Path) -> None:  # noqa: F811
    rx = receiver("--series-timeout", "60", *pki.server())
    proc = kaapcli("send", mock_ct, "--to", rx.peer, *pki.client(), "-j", "2")
    assert proc.returncode == 0, proc.stderr
    echo = kaapcli("echo", rx.peer, *pki.client())
    assert echo.returncode == 0 and json.loads(echo.stdout)["ok"], echo.stderr
    code, _, stderr = rx.finish()
    assert code == 0 and "(TLS)" in stderr
    sent = {p.name: p.read_bytes()[p.read_bytes().index(b"\x08\x00\x05\x00"):] for p in dicom_files(mock_ct)}
    got = {p.name: p.read_bytes() for p in dicom_files(rx.out)}
    assert got.keys() == sent.keys() and all(got[name].endswith(data) for name, data in sent.items())


def test_tls_fragments_arrive_byte_for_byte_whatever_the_pdu_size(pki: Pki, mock_ct: Path, tmp_path: Path) -> None:
    """Over TLS a fragment and its P-DATA-TF header leave in one write from one buffer: datasets of several PDVs,
    of one PDV and the last PDV shorter than the others arrive unchanged."""
    from kaapcli.core.net import dimse, ul
    from kaapcli.core.net.peers import Timeouts, parse_peer
    from kaapcli.core.net.scp import Receiver
    from kaapcli.core.net.tls import TLS

    rx = Receiver(tmp_path / "rx", port=0, timeouts=Timeouts.of(5),
                  tls=TLS(str(pki.server_cert), str(pki.server_key), str(pki.ca)))
    rx.start()
    try:
        files = sorted(mock_ct.rglob("*.dcm"))[:3]
        instances = [dimse.scan(f) for f in files]
        peer = parse_peer(f"RX@127.0.0.1:{rx.port}").with_tls(TLS(str(pki.client_cert), str(pki.client_key),
                                                                  str(pki.ca)))
        scu = ul.StoreSCU(peer, "TLS", Timeouts.of(5), dimse.contexts_for(instances))
        scu.connect()
        assert scu.is_tls
        for inst, max_data in zip(instances, (1000, 1 << 20, 4097), strict=True):
            scu.max_data = max_data
            scu.store(inst.sop_class, inst.sop_instance, inst.syntax, (inst.path, inst.offset))
        assert sorted(status.code for _, status in scu.drain()) == [0, 0, 0]
        scu.release()
    finally:
        rx.stop(grace=2)
    stored = {p.stem: p for p in rx.out.rglob("*.dcm") if not p.name.startswith(".")}
    for inst in instances:
        got = stored[inst.path.stem].read_bytes()
        assert got[ul.read_meta(stored[inst.path.stem])[1]:] == inst.path.read_bytes()[inst.offset:]


@pytest.mark.parametrize(("case", "extra", "reason"), [
    ("no client certificate", ["--tls", "--tls-ca", "ca"], "TLS handshake"),
    ("untrusted server", ["--tls", "--tls-ca", "rogue"], "certificate is not trusted"),
    ("plain TCP to a TLS port", [], "association failed"),
])
def test_tls_failures_are_one_line_exit_69(receiver, pki: Pki, mock_ct: Path, case: str, extra: list[str],  # noqa: F811
                                           reason: str) -> None:
    rx = receiver(*pki.server(), "--timeout", "5")
    paths = {"ca": str(pki.ca), "rogue": str(pki.rogue_ca)}
    args = [paths.get(a, a) for a in extra]
    for command in (["send", mock_ct, "--to", rx.peer], ["echo", rx.peer]):
        proc = kaapcli(*command, *args, "--timeout", "5", timeout=60)
        assert proc.returncode == 69, (case, command[0], proc.stderr)
        errors = [line for line in proc.stderr.splitlines() if "error" in line]
        assert len(errors) == 1 and f"127.0.0.1:{rx.port}" in errors[0], (case, proc.stderr)
        if command[0] == "send":
            assert reason in errors[0], (case, errors[0])
    _, _, stderr = rx.finish()
    assert dicom_files(rx.out) == []
    if case != "untrusted server":  # the receiver reports the handshakes it refused
        assert "TLS handshake failed" in stderr or "protocol error" in stderr, stderr


def test_host_name_is_verified_unless_chain_only(receiver, pki: Pki, mock_ct: Path) -> None:  # noqa: F811
    rx = receiver("--tls", "--tls-cert", str(pki.name_only_cert), "--tls-key", str(pki.name_only_key))
    one = str(sorted(dicom_files(mock_ct))[0])
    by_ip = kaapcli("send", one, "--to", rx.peer, "--tls", "--tls-ca", str(pki.ca))
    assert by_ip.returncode == 69 and "not for that host (IP address mismatch" in by_ip.stderr, by_ip.stderr
    assert "hint: --tls-verify chain" in by_ip.stderr
    by_name = kaapcli("send", one, "--to", f"RX@localhost:{rx.port}", "--tls", "--tls-ca", str(pki.ca))
    assert by_name.returncode == 0, by_name.stderr
    chain = kaapcli("send", one, "--to", rx.peer, "--tls", "--tls-ca", str(pki.ca), "--tls-verify", "chain")
    assert chain.returncode == 0, chain.stderr


def test_tls_options_without_tls_are_a_usage_error(mock_ct: Path, pki: Pki) -> None:
    proc = kaapcli("send", mock_ct, "--to", "X@127.0.0.1:1", "--tls-ca", str(pki.ca))
    assert proc.returncode == 2 and "--tls-ca without --tls" in proc.stderr
    receive = kaapcli("receive", "-o", "/nonexistent", "--tls")
    assert receive.returncode == 2 and "needs --tls-cert and --tls-key" in receive.stderr


def test_tls_from_a_pacs_profile(receiver, pki: Pki, mock_ct: Path, tmp_path: Path) -> None:  # noqa: F811
    rx = receiver(*pki.server())
    config = tmp_path / "kaapcli.toml"
    config.write_text(f'[pacs.site]\naet = "RX"\nhost = "127.0.0.1"\nport = {rx.port}\ntls = true\n'
                      f'tls_ca = "{pki.ca}"\ntls_cert = "{pki.client_cert}"\ntls_key = "{pki.client_key}"\n')
    env = {"KAAPCLI_CONFIG": str(config)}
    assert kaapcli("send", mock_ct, "--to", "site", "-q", env=env).returncode == 0
    plain = kaapcli("echo", "site", "--no-tls", "--timeout", "3", env=env)
    assert plain.returncode == 69
    shown = json.loads(kaapcli("config", "show", env=env).stdout)["profiles"]["pacs"]["site"]
    assert shown["tls_key"] == str(pki.client_key)  # a path is not a secret: shown


# --------------------------------------------------------------------------- DCMTK +tls, both ways

def dcmtk_tls(pki: Pki, cert: Path, key: Path) -> list[str]:
    return ["+tls", str(key), str(cert), "+cf", str(pki.ca)]


def test_dcmtk_storescu_and_echoscu_to_kaapcli_over_tls(receiver, pki: Pki, mock_ct: Path) -> None:  # noqa: F811
    rx = receiver("--series-timeout", "60", *pki.server())
    store = subprocess.run([dcmtk("storescu"), *dcmtk_tls(pki, pki.client_cert, pki.client_key), "-aec", "RX", "+sd",
                            "+r", "+sp", "*.dcm", "127.0.0.1", str(rx.port), str(mock_ct)], capture_output=True,
                           text=True, timeout=60)
    assert store.returncode == 0, store.stderr
    echo = subprocess.run([dcmtk("echoscu"), *dcmtk_tls(pki, pki.client_cert, pki.client_key), "127.0.0.1",
                           str(rx.port)], capture_output=True, text=True, timeout=30)
    assert echo.returncode == 0, echo.stderr
    anonymous = subprocess.run([dcmtk("echoscu"), "+tla", "+cf", str(pki.ca), "127.0.0.1", str(rx.port)],
                               capture_output=True, text=True, timeout=30)
    assert anonymous.returncode != 0  # mutual authentication: no client certificate, no association
    rx.finish()
    assert len(dicom_files(rx.out)) == 16


def test_kaapcli_to_dcmtk_storescp_over_tls(pki: Pki, mock_ct: Path, tmp_path: Path) -> None:
    port = free_port()
    out = tmp_path / "scp"
    out.mkdir()
    proc = subprocess.Popen([dcmtk("storescp"), *dcmtk_tls(pki, pki.server_cert, pki.server_key), "-od", str(out),
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "TCP_NODELAY": "1"})
    try:
        wait_port(port, proc=proc)
        sent = kaapcli("send", mock_ct, "--to", f"STORESCP@127.0.0.1:{port}", *pki.client())
        assert sent.returncode == 0, sent.stderr
        echo = kaapcli("echo", f"STORESCP@127.0.0.1:{port}", *pki.client())
        assert echo.returncode == 0, echo.stderr
        no_cert = kaapcli("echo", f"STORESCP@127.0.0.1:{port}", "--tls", "--tls-ca", str(pki.ca), "--timeout", "5")
        assert no_cert.returncode == 69  # storescp requires a client certificate by default
    finally:
        stop(proc)
    assert len([p for p in out.iterdir() if p.is_file()]) == 16


# --------------------------------------------------------------------------- Orthanc DicomTlsEnabled

@dataclass
class OrthancTls(Orthanc):
    rx_port: int = 0  # where Orthanc pushes to the kaapcli receiver it knows as KAAPRX


@pytest.fixture(scope="module")
def orthanc_tls(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[OrthancTls]:
    """Orthanc with DICOM TLS on its DICOM port (client certificates required), knowing kaapcli's C-MOVE receiver
    and a kaapcli receiver as TLS modalities."""
    if not ORTHANC.exists():
        pytest.skip("Orthanc not installed (apt-get install orthanc)")
    root = tmp_path_factory.mktemp("orthanc-tls")
    peer = OrthancTls("ORTHANC", free_port(), free_port(), free_port(), free_port())
    config = {
        "Name": "kaapcli-tls", "DicomAet": "ORTHANC", "DicomPort": peer.dicom_port, "HttpPort": peer.http_port,
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "HttpBindAddress": "127.0.0.1",
        "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
        "DicomTlsEnabled": True, "DicomTlsCertificate": str(pki.server_cert), "DicomTlsPrivateKey": str(pki.server_key),
        "DicomTlsTrustedCertificates": str(pki.ca), "DicomTlsRemoteCertificateRequired": True,
        "DicomModalities": {
            "kaapmove": {"AET": MOVE_AET, "Host": "127.0.0.1", "Port": peer.move_port, "UseDicomTls": True},
            "kaaprx": {"AET": "KAAPRX", "Host": "127.0.0.1", "Port": peer.rx_port, "UseDicomTls": True}},
        "DicomAlwaysAllowFind": True, "DicomAlwaysAllowGet": True, "DicomAlwaysAllowMove": True,
        "DicomAlwaysAllowStore": True, "DicomAlwaysAllowEcho": True, "DicomScpTimeout": 10,
    }
    with run_orthanc(root, config):
        yield peer


def test_orthanc_over_tls_echo_send_query_get_move(orthanc_tls: OrthancTls, pki: Pki, mock_ct: Path,
                                                   tmp_path: Path) -> None:
    tls = pki.client()
    assert kaapcli("echo", orthanc_tls.dimse, *tls).returncode == 0
    sent = kaapcli("send", mock_ct, "--to", orthanc_tls.dimse, *tls, "-q")
    assert sent.returncode == 0, sent.stderr
    series = [json.loads(line) for line in kaapcli("query", orthanc_tls.dimse, "-l", "series", *tls).stdout.split("\n")
              if line]
    assert len(series) == 2
    uid = series[0]["0020000E"]["Value"][0]
    got = kaapcli("retrieve", orthanc_tls.dimse, "-k", f"SeriesInstanceUID={uid}", "-o", tmp_path / "get", *tls)
    assert got.returncode == 0 and len(dicom_files(tmp_path / "get")) == 8, got.stderr
    # C-MOVE: Orthanc connects back over TLS to kaapcli's receiver, which requires Orthanc's client certificate
    moved = kaapcli("retrieve", orthanc_tls.dimse, "-k", f"SeriesInstanceUID={uid}", "-o", tmp_path / "move",
                    "--method", "move", "--aet", MOVE_AET, "--port", str(orthanc_tls.move_port),
                    "--tls", "--tls-ca", str(pki.ca), "--tls-cert", str(pki.server_cert), "--tls-key",
                    str(pki.server_key))
    assert moved.returncode == 0 and len(dicom_files(tmp_path / "move")) == 8, moved.stderr
    plain = kaapcli("echo", orthanc_tls.dimse, "--timeout", "5")
    assert plain.returncode == 69


def test_orthanc_pushes_to_kaapcli_receive_over_tls(receiver, orthanc_tls: OrthancTls, pki: Pki,  # noqa: F811
                                                    mock_ct: Path, tmp_path: Path) -> None:
    import requests

    assert kaapcli("send", mock_ct, "--to", orthanc_tls.dimse, *pki.client(), "-q").returncode == 0
    rx = receiver("--aet", "KAAPRX", *pki.server(), out=tmp_path / "pushed", port=orthanc_tls.rx_port)
    studies = requests.get(f"{orthanc_tls.rest}/studies", timeout=10).json()
    answer = requests.post(f"{orthanc_tls.rest}/modalities/kaaprx/store", json={"Resources": studies,
                                                                                "Synchronous": True}, timeout=60)
    assert answer.ok, answer.text
    time.sleep(0.3)
    rx.finish()
    assert len(dicom_files(rx.out)) == 16
