#!/usr/bin/env python3
"""Measures libiscsi's iscsi-perf and `iscsi-bypass bench` against the same
targets in one run, with the same block size and queue depth, and prints
IOPS, latency and initiator CPU per I/O for both, and the ratio ours/theirs.

Targets: tgtd (a tmpfs-backed LUN; needs root and Debian's tgt) and the
embedded null target run as a separate process (`iscsi-bypass target --null`),
so neither initiator's CPU figure includes a target.

CPU per I/O: for iscsi-perf, user+sys of its process (getrusage of the
child) over the I/Os it reports; for iscsi-bypass, the on-CPU time of the
initiator's threads over the measured window (from /proc schedstat), as
its JSON reports. iscsi-perf prints no latency percentiles; its QD1 latency
is 1/IOPS, the mean, which at queue depth 1 is the per-I/O service time.

Usage: bench/compare-libiscsi.sh [seconds-per-run]
"""

import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "iscsi-bypass")
SECONDS = int(sys.argv[1]) if len(sys.argv) > 1 else 10
BS = 4096
QD = 32


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listens on port {port}")


def run_iscsi_perf(url, qd, seconds):
    """Returns (iops, cpu_seconds)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.run(
        ["iscsi-perf", "-m", str(qd), "-b", str(BS // 512), "-r", "-t", str(seconds), url],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    m = re.findall(r"iops average (\d+)", p.stdout)
    if not m:
        raise SystemExit(f"iscsi-perf printed no result: {p.stdout[-500:]} {p.stderr[-500:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return float(m[-1]), cpu


def run_ours(url, qd, seconds):
    """Returns the parsed JSON report."""
    p = subprocess.run(
        [BIN, "--json", "bench", url, "--engine", "inline", "--rw", "randread", "--bs", str(BS),
         "--iodepth", str(qd), "--runtime", f"{seconds}s", "--ramp", "1s"],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    )
    if p.returncode != 0:
        raise SystemExit(f"iscsi-bypass bench failed: {p.stderr}")
    return json.loads(p.stdout)


def measure(name, url):
    rows = {}
    iops_t, cpu_t = run_iscsi_perf(url, QD, SECONDS)
    ios_t = iops_t * SECONDS
    ours = run_ours(url, QD, SECONDS)
    r = ours["jobs"][0]["read"]
    rows["qd32"] = {
        "theirs_iops": iops_t,
        "theirs_cpu_ns_per_io": cpu_t * 1e9 / ios_t if ios_t else 0,
        "theirs_iops_per_cpu_s": ios_t / cpu_t if cpu_t else 0,
        "ours_iops": r["iops"],
        "ours_cpu_ns_per_io": ours["iscsi_bypass"]["cpu_ns_per_io"],
        "ours_iops_per_cpu_s": ours["iscsi_bypass"]["iops_per_cpu_second"],
        "ours_p50_us": r["clat_ns"]["percentile"]["50.000000"] / 1e3,
        "ours_p99_us": r["clat_ns"]["percentile"]["99.000000"] / 1e3,
    }
    iops_t1, _ = run_iscsi_perf(url, 1, SECONDS)
    ours1 = run_ours(url, 1, SECONDS)
    r1 = ours1["jobs"][0]["read"]
    rows["qd1"] = {
        "theirs_iops": iops_t1,
        "theirs_mean_us": 1e6 / iops_t1 if iops_t1 else 0,
        "ours_iops": r1["iops"],
        "ours_p50_us": r1["clat_ns"]["percentile"]["50.000000"] / 1e3,
        "ours_mean_us": r1["clat_ns"]["mean"] / 1e3,
        "ours_p99_us": r1["clat_ns"]["percentile"]["99.000000"] / 1e3,
    }
    q, s = rows["qd32"], rows["qd1"]
    print(f"\n== {name}: 4 KiB random read, {SECONDS}s per run")
    print(f"  QD{QD}  iscsi-perf : {q['theirs_iops']:>9.0f} IOPS  {q['theirs_cpu_ns_per_io']:>7.0f} ns CPU/IO  {q['theirs_iops_per_cpu_s']:>9.0f} IOPS/CPU-s")
    print(f"  QD{QD}  ours       : {q['ours_iops']:>9.0f} IOPS  {q['ours_cpu_ns_per_io']:>7.0f} ns CPU/IO  {q['ours_iops_per_cpu_s']:>9.0f} IOPS/CPU-s  p50 {q['ours_p50_us']:.1f} us  p99 {q['ours_p99_us']:.1f} us")
    ratio_eff = q["ours_iops_per_cpu_s"] / q["theirs_iops_per_cpu_s"] if q["theirs_iops_per_cpu_s"] else 0
    ratio_iops = q["ours_iops"] / q["theirs_iops"] if q["theirs_iops"] else 0
    print(f"  QD{QD}  ratio ours/theirs: IOPS {ratio_iops:.2f}x, IOPS per CPU-second {ratio_eff:.2f}x (goal >= 1.5x)")
    print(f"  QD1   iscsi-perf : {s['theirs_iops']:>9.0f} IOPS  mean {s['theirs_mean_us']:.1f} us (1/IOPS)")
    print(f"  QD1   ours       : {s['ours_iops']:>9.0f} IOPS  p50 {s['ours_p50_us']:.1f} us  mean {s['ours_mean_us']:.1f} us  p99 {s['ours_p99_us']:.1f} us")
    ratio_lat = s["ours_p50_us"] / s["theirs_mean_us"] if s["theirs_mean_us"] else 0
    print(f"  QD1   ratio ours p50 / theirs mean: {ratio_lat:.2f}x (goal <= 0.8x)")
    rows["ratios"] = {"iops": ratio_iops, "iops_per_cpu_second": ratio_eff, "qd1_latency": ratio_lat}
    return rows


def main():
    if not shutil.which("iscsi-perf"):
        raise SystemExit("iscsi-perf not found: install libiscsi-bin (scripts/setup.sh)")
    results = {}
    procs = []
    tmp = tempfile.mkdtemp(prefix="ib-compare-")
    try:
        port = free_port()
        p = subprocess.Popen([BIN, "target", "--null", "--size", "1g", "--portal", f"127.0.0.1:{port}",
                              "--iqn", "iqn.2026-11.org.iscsi-bypass:compare"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(p)
        wait_port(port)
        results["embedded-null"] = measure("embedded null target (separate process)",
                                           f"iscsi://127.0.0.1:{port}/iqn.2026-11.org.iscsi-bypass:compare/0")
        if os.geteuid() == 0 and shutil.which("tgtd"):
            tport = free_port()
            ctl = str(3000 + os.getpid() % 1000)
            lun = os.path.join("/dev/shm", f"ib-compare-{os.getpid()}.img")
            with open(lun, "wb") as f:
                f.truncate(512 << 20)
            t = subprocess.Popen(["tgtd", "-f", "-C", ctl, "--iscsi", f"portal=127.0.0.1:{tport}"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(t)
            wait_port(tport)
            iqn = "iqn.2026-11.org.iscsi-bypass:tgtd"
            adm = ["tgtadm", "-C", ctl, "--lld", "iscsi"]
            subprocess.run(adm + ["--mode", "target", "--op", "new", "--tid", "1", "-T", iqn], check=True)
            subprocess.run(adm + ["--mode", "logicalunit", "--op", "new", "--tid", "1", "--lun", "1", "-b", lun], check=True)
            subprocess.run(adm + ["--mode", "target", "--op", "bind", "--tid", "1", "-I", "ALL"], check=True)
            try:
                results["tgtd"] = measure("tgtd (tmpfs LUN)", f"iscsi://127.0.0.1:{tport}/{iqn}/1")
            finally:
                os.unlink(lun)
        else:
            print("\n(tgtd skipped: needs root and Debian's tgt)")
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    out = os.path.join(ROOT, "target", "compare-libiscsi.json")
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nraw figures: {out}")


if __name__ == "__main__":
    main()
