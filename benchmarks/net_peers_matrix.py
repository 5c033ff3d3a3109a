#!/usr/bin/env python3
"""What each networking command does with each real peer, measured: prints the README's peers table.

    python benchmarks/net_peers_matrix.py [--keep DIR]

Starts on 127.0.0.1 (ports the OS picks): DCMTK storescp (all syntaxes, and ``+xi``: implicit VR LE only),
dcmqrscp, wlmscpfs, pynetdicom's qrscp app, Orthanc with DICOMweb, and a storescp as a third AE that the
Q/R peers know as a move destination. Runs echo, send (a mock CT of 2 series × 4 slices, then a mixed set of
pydicom test files: big endian, RLE, JPEG 2000 lossless, JPEG baseline, a truncated file), query,
query --worklist, retrieve (C-GET, C-MOVE to kaapcli's receiver, C-MOVE to the third AE, WADO-RS, a missing
series), STOW-RS and delete; each cell is the exit code and what came of it, with the seconds it took.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_net import free_port, wait_port
from common import compile_kaapcli

KAAPCLI = [sys.executable, "-m", "kaapcli"]
ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
MIXED = ["emri_small_big_endian.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "SC_rgb_jpeg_dcmtk.dcm",
         "MR_truncated.dcm"]


def run(*args: object, env: dict[str, str] | None = None) -> tuple[int, str, str, float]:
    start = time.perf_counter()
    proc = subprocess.run([*KAAPCLI, *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_COLOR": "1", **(env or {})})
    return proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - start


def records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def sent_cell(rc: int, out: str, seconds: float) -> str:
    rows = records(out)
    ok = [r for r in rows if r["status"] == "ok"]
    recoded = sum(1 for r in ok if r["message"].startswith("sent as"))
    failed = [r["message"].split(": ", 2)[-1] for r in rows if r["status"] == "failed"]
    why = sorted({("truncated, refused locally" if "needs" in f and "bytes" in f else
                   "lossy: not decoded" if "lossy" in f else f[:40]) for f in failed})
    text = f"{len(ok)}/{len(rows)} ok" + (f" ({recoded} re-encoded)" if recoded else "")
    return f"{rc}: {text}" + (f"; failed: {', '.join(why)}" if why else "") + f" ({seconds:.1f} s)"


def retrieve_cell(rc: int, out: str, err: str, seconds: float) -> str:
    rows = records(out)
    if not rows:
        return f"{rc}: {err.strip().splitlines()[0][:60] if err.strip() else 'nothing'} ({seconds:.1f} s)"
    r = rows[0]
    got = r["completed"] if r.get("destination_elsewhere") else r["received"]
    text = (f"{got}/{r['expected']}" if "expected" in r else f"{got}") + (
        " at the third AE" if r.get("destination_elsewhere") else "")
    return f"{rc}: {text}" + ("" if r["ok"] else f" ({r['message'][:50]})") + f" ({seconds:.1f} s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", type=Path, help="work directory to keep (default: a temporary one)")
    args = parser.parse_args()
    compile_kaapcli()
    root = args.keep or Path(tempfile.mkdtemp(prefix="kaapcli-matrix-"))
    root.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    try:
        ports = {name: free_port() for name in ("storescp", "xi", "dcmqr", "qr", "wlm", "third", "rx", "dicom",
                                                 "http", "orx")}
        for name in ("scp", "xi", "third", "db", "wl/WLM"):
            (root / name).mkdir(parents=True, exist_ok=True)
        (root / "wl" / "WLM" / "lockfile").touch()
        nodelay = {**os.environ, "TCP_NODELAY": "1"}
        procs.append(subprocess.Popen(["storescp", "-od", str(root / "scp"), str(ports["storescp"])], env=nodelay,
                                      **quiet))
        procs.append(subprocess.Popen(["storescp", "+xi", "-od", str(root / "xi"), str(ports["xi"])], env=nodelay,
                                      **quiet))
        procs.append(subprocess.Popen(["storescp", "-aet", "THIRD", "-od", str(root / "third"), str(ports["third"])],
                                      env=nodelay, **quiet))
        (root / "dcmqrscp.cfg").write_text(
            f"NetworkTCPPort = {ports['dcmqr']}\nMaxPDUSize = 16384\nMaxAssociations = 16\nHostTable BEGIN\n"
            f"third = (THIRD, 127.0.0.1, {ports['third']})\nrx = (KAAPRX, 127.0.0.1, {ports['rx']})\nHostTable END\n"
            f"VendorTable BEGIN\nVendorTable END\nAETable BEGIN\nDCMQR {root / 'db'} RW (200, 1024mb) ANY\n"
            "AETable END\n")
        procs.append(subprocess.Popen(["dcmqrscp", "-c", str(root / "dcmqrscp.cfg")], cwd=root, **quiet))
        (root / "qrscp.ini").write_text(
            f"[DEFAULT]\nae_title: QRSCP\nport: {ports['qr']}\nmax_pdu: 16382\nacse_timeout: 30\ndimse_timeout: 30\n"
            f"network_timeout: 30\nbind_address: 127.0.0.1\ninstance_location: {root / 'qrinst'}\n"
            f"database_location: {root / 'qr.sqlite'}\nlog_identifier: False\n[THIRD]\naddress: 127.0.0.1\n"
            f"port: {ports['third']}\n[KAAPRX]\naddress: 127.0.0.1\nport: {ports['rx']}\n")
        procs.append(subprocess.Popen([sys.executable, "-m", "pynetdicom", "qrscp", "-c", str(root / "qrscp.ini")],
                                      cwd=root, **quiet))
        (root / "wl.dump").write_text(
            "(0008,0005) CS [ISO_IR 100]\n(0008,0050) SH [ACC1]\n(0010,0010) PN [Doe^J]\n(0010,0020) LO [P1]\n"
            "(0020,000d) UI [1.2.826.0.1.3680043.10.1543.99.1]\n(0032,1060) LO [CT chest]\n(0040,1001) SH [RP1]\n"
            "(0040,0100) SQ (Sequence with undefined length)\n(fffe,e000) na (Item with undefined length)\n"
            "(0008,0060) CS [CT]\n(0040,0001) AE [CT1]\n(0040,0002) DA [20261204]\n(0040,0003) TM [090000]\n"
            "(0040,0007) LO [CT chest]\n(0040,0009) SH [SPS1]\n(fffe,e00d) na (ItemDelimitationItem)\n"
            "(fffe,e0dd) na (SequenceDelimitationItem)\n")
        subprocess.run(["dump2dcm", str(root / "wl.dump"), str(root / "wl" / "WLM" / "1.wl")], check=True, **quiet)
        procs.append(subprocess.Popen(["wlmscpfs", "-dfp", str(root / "wl"), str(ports["wlm"])], **quiet))
        (root / "orthanc.json").write_text(json.dumps({
            "Name": "matrix", "DicomAet": "ORTHANC", "DicomPort": ports["dicom"], "HttpPort": ports["http"],
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "HttpBindAddress": "127.0.0.1",
            "StorageDirectory": str(root / "orthanc"), "IndexDirectory": str(root / "orthanc"),
            "Plugins": [DICOMWEB], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "DicomModalities": {"third": ["THIRD", "127.0.0.1", ports["third"]],
                                "rx": ["KAAPRX", "127.0.0.1", ports["orx"]]},
            "DicomAlwaysAllowGet": True, "DicomAlwaysAllowMove": True, "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowStore": True, "DicomScpTimeout": 10}))
        procs.append(subprocess.Popen([ORTHANC, str(root / "orthanc.json")], **quiet))
        for port in ports.values():
            if port not in (ports["rx"], ports["orx"]):
                wait_port(port)
        time.sleep(1)  # Orthanc's REST API comes up after its ports

        import pydicom.data

        assert run("mock", "-o", root / "mock", "--series", "2", "--slices", "4", "--rows", "64", "--columns", "64",
                   "--seed", "21", "-q")[0] == 0
        (root / "mixed").mkdir(exist_ok=True)
        for name in MIXED:
            shutil.copy(pydicom.data.get_testdata_file(name), root / "mixed" / name)
        series = sorted({str(pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID)
                         for p in (root / "mock").rglob("*.dcm")})[0]
        web = f"http://127.0.0.1:{ports['http']}/dicom-web"
        peers = {
            "DCMTK storescp": f"STORESCP@127.0.0.1:{ports['storescp']}",
            "storescp +xi": f"XI@127.0.0.1:{ports['xi']}",
            "DCMTK dcmqrscp": f"DCMQR@127.0.0.1:{ports['dcmqr']}",
            "pynetdicom qrscp": f"QRSCP@127.0.0.1:{ports['qr']}",
            "DCMTK wlmscpfs": f"WLM@127.0.0.1:{ports['wlm']}",
            "Orthanc (DIMSE)": f"ORTHANC@127.0.0.1:{ports['dicom']}",
            "Orthanc (DICOMweb)": web,
        }
        stores = {"DCMTK storescp", "storescp +xi", "DCMTK dcmqrscp", "pynetdicom qrscp", "Orthanc (DIMSE)",
                  "Orthanc (DICOMweb)"}
        qr = {"DCMTK dcmqrscp", "pynetdicom qrscp", "Orthanc (DIMSE)", "Orthanc (DICOMweb)"}
        rx_port = {"DCMTK dcmqrscp": ports["rx"], "pynetdicom qrscp": ports["rx"], "Orthanc (DIMSE)": ports["orx"]}
        table: dict[str, dict[str, str]] = {}
        for label, peer in peers.items():
            cells = table.setdefault(label, {})
            rc, out, err, sec = run("echo", peer)
            cells["echo"] = f"{rc}: {'ok' if rc == 0 else err.strip()[:60]} ({sec:.1f} s)"
            rc, _, err, sec = run("echo", peer.replace("@", "X@", 1) if "@" in peer else peer + "/nowhere")
            why = err.strip().split("Reason: ")[-1].rstrip(")") if "Reason: " in err else err.strip().split(": ")[-1]
            cells["echo, wrong called AE / URL"] = f"{rc}: " + (why if rc else "accepted (any called AE)")
            if label in stores:
                rc, out, _, sec = run("send", root / "mock", "--to", peer, "--format", "jsonl")
                cells["send 8 files"] = sent_cell(rc, out, sec)
                rc, out, _, sec = run("send", root / "mixed", "--to", peer, "--format", "jsonl")
                cells["send mixed syntaxes"] = sent_cell(rc, out, sec)
            if label in qr:
                rc, out, _, sec = run("query", peer, "-l", "series", "-k", "PatientID=MOCK*")
                found = records(out)
                distinct = len({r["0020000E"]["Value"][0] for r in found})
                cells["query -l series PatientID=MOCK* (2 series)"] = (
                    f"{rc}: {len(found)} matches" + (f", {distinct} distinct" if distinct != len(found) else "")
                    + f" ({sec:.1f} s)")
                rc, out, err, sec = run("retrieve", peer, "-k", f"SeriesInstanceUID={series}", "-o",
                                        root / "out" / label / "get", "--format", "jsonl")
                cells["retrieve -k SeriesInstanceUID (get / WADO)"] = retrieve_cell(rc, out, err, sec)
                if label in rx_port:
                    rc, out, err, sec = run("retrieve", peer, "-k", f"SeriesInstanceUID={series}", "-o",
                                            root / "out" / label / "move", "--method", "move", "--aet", "KAAPRX",
                                            "--port", rx_port[label], "--bind", "127.0.0.1", "--format", "jsonl")
                    cells["retrieve --method move"] = retrieve_cell(rc, out, err, sec)
                    rc, out, err, sec = run("retrieve", peer, "-k", f"SeriesInstanceUID={series}", "-o",
                                            root / "out" / label / "dest", "--dest", "THIRD", "--format", "jsonl")
                    cells["retrieve --dest THIRD"] = retrieve_cell(rc, out, err, sec)
                rc, out, err, sec = run("retrieve", peer, "-k", "SeriesInstanceUID=1.2.3.4", "-o",
                                        root / "out" / label / "none")
                cells["retrieve a missing series"] = f"{rc}: {err.strip().splitlines()[0].split(': ', 2)[-1][:60]}"
            if label == "DCMTK wlmscpfs":
                rc, out, _, sec = run("query", peer, "--worklist", "-k", "Modality=CT")
                cells["query --worklist -k Modality=CT"] = f"{rc}: {len(records(out))} matches ({sec:.1f} s)"
            if label == "Orthanc (DICOMweb)":
                rc, _, err, sec = run("delete", peer, "--series", series, "--series", "1.2.3.4", "--server-type",
                                      "orthanc", "--yes")
                lines = err.strip().splitlines()
                deleted = sum("/series/" in line for line in lines)
                missing = [line.split(": ", 2)[-1] for line in lines if "error" in line]
                cells["delete --series A --series missing"] = f"{rc}: {deleted} deleted; {'; '.join(missing)}"
        columns = list(dict.fromkeys(c for cells in table.values() for c in cells))
        print("| command | " + " | ".join(table) + " |")
        print("|---|" + "---|" * len(table))
        for column in columns:
            print(f"| {column} | " + " | ".join(table[label].get(column, "—") for label in table) + " |")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
