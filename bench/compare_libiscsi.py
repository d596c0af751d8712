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

Environment:
  BIN=path       the iscsi-bypass binary to measure (default target/release)
  BEFORE=path    a second iscsi-bypass binary (say, the commit before a
                 change) measured in the same run, right after iscsi-perf,
                 so before/after share the load: adds before_p50_us=,
                 before_cpu_ns_per_io=, before_per_cpu_x=,
                 before_p50_over_their_mean= to each RESULT line
  CASES=4k:1,128k:8   only these cases (bs:qd)
  TARGETS=tgtd   only these targets (embedded-null, tgtd)
  ROUNDS=n       n rounds per case, the initiators taking turns; figures
                 and ratios are medians over the rounds (default 1)
  SYSCALLS=1     also count system calls per I/O of each initiator, in a
                 run of its own under `strace -f -c` (slow, so not timed):
                 adds theirs_syscalls_per_io=, ours_syscalls_per_io= (and
                 before_syscalls_per_io=)
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
BEFORE = os.environ.get("BEFORE")
SYSCALLS = os.environ.get("SYSCALLS") == "1"
STRACE_SECONDS = 3
ROUNDS = int(os.environ.get("ROUNDS", "1"))


def parse_cases(spec):
    out = []
    for item in spec.split(","):
        bs, qd = item.strip().lower().split(":")
        size = int(bs[:-1]) << 10 if bs.endswith("k") else int(bs)
        out.append((size, int(qd)))
    return out


if os.environ.get("CASES"):
    CASES = parse_cases(os.environ["CASES"])
TARGETS = set(filter(None, os.environ.get("TARGETS", "embedded-null,tgtd").split(",")))


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


def perf_args(url, bs, qd, seconds):
    return ["iscsi-perf", "-m", str(qd), "-b", str(bs // 512), "-r", "-t", str(seconds), url]


def ours_args(binary, url, bs, qd, seconds, ramp="1s"):
    return [binary, "--json", "bench", url, "--engine", "inline", "--rw", "randread", "--bs",
            str(bs), "--iodepth", str(qd), "--runtime", f"{seconds}s", "--ramp", ramp]


def count_syscalls(args):
    """Runs `args` under `strace -f -c`; returns (system calls, stdout)."""
    with tempfile.NamedTemporaryFile(prefix="ib-strace-", suffix=".txt") as f:
        p = subprocess.run(["strace", "-f", "-c", "-o", f.name] + args, capture_output=True,
                           text=True, timeout=STRACE_SECONDS + 120)
        table = open(f.name).read()
    for line in table.splitlines():
        fields = line.split()
        # % time, seconds, usecs/call, calls, [errors], "total"
        if fields and fields[-1] == "total" and len(fields) >= 5:
            return int(fields[3]), p.stdout
    raise SystemExit(f"strace printed no total: {table[-500:]} {p.stderr[-500:]}")


def syscalls_per_io_theirs(url, bs, qd):
    calls, out = count_syscalls(perf_args(url, bs, qd, STRACE_SECONDS))
    m = re.findall(r"iops average (\d+)", out)
    ios = float(m[-1]) * STRACE_SECONDS if m else 0
    return calls / ios if ios else 0


def syscalls_per_io_ours(binary, url, bs, qd):
    # No ramp: every I/O the calls served is counted (login adds ~100).
    calls, out = count_syscalls(ours_args(binary, url, bs, qd, STRACE_SECONDS, ramp="0s"))
    r = json.loads(out)["jobs"][0]["read"]
    ios = r.get("total_ios") or r["iops"] * STRACE_SECONDS
    return calls / ios if ios else 0


def run_iscsi_perf(url, bs, qd, seconds):
    """Returns (iops, cpu_seconds)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.run(
        perf_args(url, bs, qd, seconds),
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


def run_ours(url, bs, qd, seconds, binary=None):
    """Returns the parsed JSON report."""
    p = subprocess.run(
        ours_args(binary or BIN, url, bs, qd, seconds),
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    )
    if p.returncode != 0:
        raise SystemExit(f"iscsi-bypass bench failed: {p.stderr}")
    return json.loads(p.stdout)


def ours_row(ours):
    r = ours["jobs"][0]["read"]
    return {
        "iops": r["iops"],
        "cpu_ns_per_io": ours["iscsi_bypass"]["cpu_ns_per_io"],
        "iops_per_cpu_s": ours["iscsi_bypass"]["iops_per_cpu_second"],
        "p50_us": r["clat_ns"]["percentile"]["50.000000"] / 1e3,
        "mean_us": r["clat_ns"]["mean"] / 1e3,
        "p99_us": r["clat_ns"]["percentile"]["99.000000"] / 1e3,
    }


def median(values):
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def measure_case(target, url, bs, qd):
    """ROUNDS rounds of every initiator one after the other (so a load that
    comes and goes hits them alike); each figure and each ratio is the
    median over the rounds. Prints the case's RESULT line."""
    rounds = []
    for i in range(ROUNDS):
        r = measure_round(url, bs, qd, swap=i % 2 == 1)
        rounds.append(r)
        if ROUNDS > 1:
            extra = "".join(f" {w}: p50 {r[w + '_p50_us']:.1f} us {r[w + '_cpu_ns_per_io']:.0f} ns/IO"
                            for w in ("ours", "before") if f"{w}_iops" in r)
            print(f"    round {i + 1}: iscsi-perf mean {r['theirs_mean_us']:.1f} us "
                  f"{r['theirs_cpu_ns_per_io']:.0f} ns/IO;{extra}; load {r['load']:.1f}", flush=True)
    row = {k: median([r[k] for r in rounds]) for k in rounds[0]}
    iops_t = row["theirs_iops"]
    runs = [w for w in ("ours", "before") if f"{w}_iops" in row]
    if SYSCALLS:
        row["theirs_syscalls_per_io"] = syscalls_per_io_theirs(url, bs, qd)
        row["ours_syscalls_per_io"] = syscalls_per_io_ours(BIN, url, bs, qd)
        if BEFORE:
            row["before_syscalls_per_io"] = syscalls_per_io_ours(BEFORE, url, bs, qd)
    print_case(target, bs, qd, row, runs)
    row["rounds"] = rounds
    return row


def measure_round(url, bs, qd, swap=False):
    """iscsi-perf, then ours and the BEFORE binary (in turn first: `swap`)."""
    iops_t, cpu_t = run_iscsi_perf(url, bs, qd, SECONDS)
    ios_t = iops_t * SECONDS
    runs = {}
    order = [("ours", BIN)] + ([("before", BEFORE)] if BEFORE else [])
    for who, binary in (reversed(order) if swap else order):
        runs[who] = ours_row(run_ours(url, bs, qd, SECONDS, binary))
    runs = {w: runs[w] for w, _ in order}
    row = {
        "theirs_iops": iops_t,
        "theirs_mean_us": 1e6 * qd / iops_t if iops_t else 0,
        "theirs_cpu_ns_per_io": cpu_t * 1e9 / ios_t if ios_t else 0,
        "theirs_iops_per_cpu_s": ios_t / cpu_t if cpu_t else 0,
    }
    for who, r in runs.items():
        for k, v in r.items():
            row[f"{who}_{k}"] = v
        row[f"{who}_iops_x"] = r["iops"] / iops_t if iops_t else 0
        row[f"{who}_per_cpu_x"] = (r["iops_per_cpu_s"] / row["theirs_iops_per_cpu_s"]
                                   if row["theirs_iops_per_cpu_s"] else 0)
        # iscsi-perf prints no percentiles: at QD1 its mean latency is 1/IOPS.
        row[f"{who}_p50_over_their_mean"] = (r["p50_us"] / row["theirs_mean_us"]
                                             if row["theirs_mean_us"] else 0)
    row["iops_x"] = row["ours_iops_x"]
    row["per_cpu_x"] = row["ours_per_cpu_x"]
    row["p50_over_their_mean"] = row["ours_p50_over_their_mean"]
    row["load"] = os.getloadavg()[0]
    return row


def print_case(target, bs, qd, row, runs):
    iops_t = row["theirs_iops"]
    bs_name = f"{bs >> 10}k"
    print(f"  {bs_name:>4} QD{qd:<2} iscsi-perf: {iops_t:>9.0f} IOPS  mean {row['theirs_mean_us']:>7.1f} us  "
          f"{row['theirs_cpu_ns_per_io']:>7.0f} ns CPU/IO")
    for who in runs:
        label = "ours" if who == "ours" else "before"
        print(f"  {bs_name:>4} QD{qd:<2} {label:<10}: {row[who + '_iops']:>9.0f} IOPS  p50  "
              f"{row[who + '_p50_us']:>7.1f} us  {row[who + '_cpu_ns_per_io']:>7.0f} ns CPU/IO  "
              f"p99 {row[who + '_p99_us']:.1f} us  p50/their mean {row[who + '_p50_over_their_mean']:.2f}  "
              f"per CPU x{row[who + '_per_cpu_x']:.2f}")
    line = (f"RESULT target={target} rw=randread bs={bs_name} qd={qd} "
            f"theirs_iops={iops_t:.0f} theirs_mean_us={row['theirs_mean_us']:.1f} "
            f"theirs_cpu_ns_per_io={row['theirs_cpu_ns_per_io']:.0f} "
            f"ours_iops={row['ours_iops']:.0f} ours_p50_us={row['ours_p50_us']:.1f} "
            f"ours_p99_us={row['ours_p99_us']:.1f} ours_cpu_ns_per_io={row['ours_cpu_ns_per_io']:.0f} "
            f"iops_x={row['iops_x']:.2f} per_cpu_x={row['per_cpu_x']:.2f} "
            f"p50_over_their_mean={row['p50_over_their_mean']:.2f}")
    if "before_iops" in row:
        line += (f" before_p50_us={row['before_p50_us']:.1f} "
                 f"before_cpu_ns_per_io={row['before_cpu_ns_per_io']:.0f} "
                 f"before_per_cpu_x={row['before_per_cpu_x']:.2f} "
                 f"before_p50_over_their_mean={row['before_p50_over_their_mean']:.2f}")
    if SYSCALLS:
        line += (f" theirs_syscalls_per_io={row['theirs_syscalls_per_io']:.1f} "
                 f"ours_syscalls_per_io={row['ours_syscalls_per_io']:.1f}")
        if BEFORE:
            line += f" before_syscalls_per_io={row['before_syscalls_per_io']:.1f}"
    line += f" rounds={ROUNDS} load={row['load']:.1f}"
    print(line, flush=True)


def measure(target, name, url):
    print(f"\n== {name}: random reads, {SECONDS}s per run; load {os.getloadavg()[0]:.2f}", flush=True)
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
        if "embedded-null" in TARGETS:
            results["embedded-null"] = measure("embedded-null", "embedded null target (separate process)",
                                               f"iscsi://127.0.0.1:{port}/iqn.2026-11.org.iscsi-bypass:compare/0")
        if "tgtd" not in TARGETS:
            pass
        elif os.geteuid() == 0 and shutil.which("tgtd"):
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
