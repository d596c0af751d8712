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

Cases: 4 KiB at QD32 and QD1, 128 KiB at QD8; one line per case:
  RESULT target=<embedded-null|tgtd> rw=randread bs= qd= theirs_iops=
         theirs_mean_us= theirs_cpu_ns_per_io= ours_iops= ours_p50_us=
         ours_p99_us= ours_cpu_ns_per_io= iops_x= per_cpu_x= p50_over_their_mean=
(theirs_mean_us = QD / IOPS; per_cpu_x = ours/theirs IOPS per CPU-second).
Ours runs the kernel transport in its default (idle, not busy-poll) mode.
Usage: [BIN=path/to/iscsi-bypass] bench/compare-libiscsi.sh [seconds-per-run]
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
BIN = os.environ.get("BIN") or os.path.join(ROOT, "target", "release", "iscsi-bypass")
SECONDS = int(sys.argv[1]) if len(sys.argv) > 1 else 10
# (block size, queue depth) per case: the QD32 and QD1 4 KiB reads,
# and 128 KiB reads at QD8 (iscsi-perf -b 256).
CASES = [(4096, 32), (4096, 1), (128 << 10, 8)]


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


def run_iscsi_perf(url, bs, qd, seconds):
    """Returns (iops, cpu_seconds)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.run(
        ["iscsi-perf", "-m", str(qd), "-b", str(bs // 512), "-r", "-t", str(seconds), url],
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


def run_ours(url, bs, qd, seconds):
    """Returns the parsed JSON report."""
    p = subprocess.run(
        [BIN, "--json", "bench", url, "--engine", "inline", "--rw", "randread", "--bs", str(bs),
         "--iodepth", str(qd), "--runtime", f"{seconds}s", "--ramp", "1s"],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    )
    if p.returncode != 0:
        raise SystemExit(f"iscsi-bypass bench failed: {p.stderr}")
    return json.loads(p.stdout)


def measure_case(target, url, bs, qd):
    """One case, both initiators, one after the other; prints its RESULT line."""
    iops_t, cpu_t = run_iscsi_perf(url, bs, qd, SECONDS)
    ios_t = iops_t * SECONDS
    ours = run_ours(url, bs, qd, SECONDS)
    r = ours["jobs"][0]["read"]
    row = {
        "theirs_iops": iops_t,
        "theirs_mean_us": 1e6 * qd / iops_t if iops_t else 0,
        "theirs_cpu_ns_per_io": cpu_t * 1e9 / ios_t if ios_t else 0,
        "theirs_iops_per_cpu_s": ios_t / cpu_t if cpu_t else 0,
        "ours_iops": r["iops"],
        "ours_cpu_ns_per_io": ours["iscsi_bypass"]["cpu_ns_per_io"],
        "ours_iops_per_cpu_s": ours["iscsi_bypass"]["iops_per_cpu_second"],
        "ours_p50_us": r["clat_ns"]["percentile"]["50.000000"] / 1e3,
        "ours_mean_us": r["clat_ns"]["mean"] / 1e3,
        "ours_p99_us": r["clat_ns"]["percentile"]["99.000000"] / 1e3,
    }
    row["iops_x"] = row["ours_iops"] / iops_t if iops_t else 0
    row["per_cpu_x"] = (row["ours_iops_per_cpu_s"] / row["theirs_iops_per_cpu_s"]
                        if row["theirs_iops_per_cpu_s"] else 0)
    # iscsi-perf prints no percentiles: at QD1 its mean latency is 1/IOPS.
    row["p50_over_their_mean"] = (row["ours_p50_us"] / row["theirs_mean_us"]
                                  if row["theirs_mean_us"] else 0)
    bs_name = f"{bs >> 10}k"
    print(f"  {bs_name:>4} QD{qd:<2} iscsi-perf: {iops_t:>9.0f} IOPS  mean {row['theirs_mean_us']:>7.1f} us  "
          f"{row['theirs_cpu_ns_per_io']:>7.0f} ns CPU/IO")
    print(f"  {bs_name:>4} QD{qd:<2} ours      : {row['ours_iops']:>9.0f} IOPS  p50  {row['ours_p50_us']:>7.1f} us  "
          f"{row['ours_cpu_ns_per_io']:>7.0f} ns CPU/IO  p99 {row['ours_p99_us']:.1f} us")
    print(f"RESULT target={target} rw=randread bs={bs_name} qd={qd} "
          f"theirs_iops={iops_t:.0f} theirs_mean_us={row['theirs_mean_us']:.1f} "
          f"theirs_cpu_ns_per_io={row['theirs_cpu_ns_per_io']:.0f} "
          f"ours_iops={row['ours_iops']:.0f} ours_p50_us={row['ours_p50_us']:.1f} "
          f"ours_p99_us={row['ours_p99_us']:.1f} ours_cpu_ns_per_io={row['ours_cpu_ns_per_io']:.0f} "
          f"iops_x={row['iops_x']:.2f} per_cpu_x={row['per_cpu_x']:.2f} "
          f"p50_over_their_mean={row['p50_over_their_mean']:.2f}", flush=True)
    return row


def measure(target, name, url):
    print(f"\n== {name}: random reads, {SECONDS}s per run", flush=True)
    return {f"{bs >> 10}k_qd{qd}": measure_case(target, url, bs, qd) for bs, qd in CASES}


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
        results["embedded-null"] = measure("embedded-null", "embedded null target (separate process)",
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
                results["tgtd"] = measure("tgtd", "tgtd (tmpfs LUN)", f"iscsi://127.0.0.1:{tport}/{iqn}/1")
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
