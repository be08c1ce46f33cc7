"""The short table that benchmarks/gpu_check.sh prints last, from the logs and JSON in a folder:
each step's outcome and time, the CUDA tests' counts, the op, synchronized-norm, block and
model figures against stock, the largest cube that trains, and what augmentation costs. Reads
whatever is there (a step that failed or was skipped leaves no JSON), and never fails itself.

    python benchmarks/gpu_check_summary.py FOLDER
"""
import json
import os
import sys
import xml.etree.ElementTree as ET

STATES = {"0": "ok", "skip": "SKIPPED (budget)", "missing": "NOT RUN (no compute-sanitizer)",
          "124": "TIMED OUT"}


def load(folder, name):
    path = os.path.join(folder, name)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def steps(folder):
    try:
        lines = open(os.path.join(folder, "steps.txt")).read().split("\n")
    except OSError:
        return
    for line in filter(None, lines):
        name, rc, secs = line.split()
        print(f"{name:<20} {STATES.get(rc, 'FAILED rc=' + rc):<32} {secs:>4} s")


def tests(folder):
    try:
        suite = ET.parse(os.path.join(folder, "tests.xml")).getroot()
    except (OSError, ET.ParseError):
        return
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: suite.get(k, "0") for k in ("tests", "failures", "errors", "skipped")}
    print("CUDA tests: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    for case in suite.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            print(f"  FAILED {case.get('classname')}::{case.get('name')}")


def ratio(r, key):
    v = r.get(key)
    return "  -  " if v is None else f"x{v:.2f}"


def benchmarks(folder):
    for tag in ("fp32", "bf16", "fp32_cl", "bf16_cl"):
        data = load(folder, f"bench_ops_{tag}.json") or {}
        for r in data.get("rows", []):
            if r["variant"].startswith("effseg"):
                frac = r.get("copy_bandwidth_fraction")
                print(f"ops {tag:<8} {str(tuple(r['shape'])):<22} {r['variant']:<20} "
                      f"time {ratio(r, 'time_vs_stock')} saved {ratio(r, 'saved_vs_stock')} "
                      f"{r['gbps']:.0f} GB/s" + (f" ({100 * frac:.0f}% of copy)" if frac else ""))
        for r in data.get("ops", []):
            print(f"op  {tag:<8} {str(tuple(r['shape'])):<22} {r['op']:<36} "
                  f"{r['gbps']:.0f} GB/s ({100 * r['copy_fraction']:.0f}% of copy)")
    for r in (load(folder, "bench_sync.json") or {}).get("rows", []):
        print(f"sync {str(tuple(r['shape'])):<22} {r['what']:<38} overhead "
              f"{100 * r['overhead']:+.1f}% (max |sync - local| {r['max_abs_diff']:.1e})")
    for name in ("bench_blocks", "bench_model"):
        data = load(folder, f"{name}.json") or {}
        for r in data.get("rows", []):
            size = r.get("shape") or r.get("edge")
            print(f"{name[6:]:<6} {str(size):<22} {r['variant']:<24} saved "
                  f"{ratio(r, 'saved_vs_stock')} peak {ratio(r, 'peak_vs_stock')} "
                  f"({r['peak_bytes'] / 2**30:.2f} GiB) time {ratio(r, 'seconds_vs_stock')} "
                  f"({r['seconds'] * 1e3:.0f} ms)")
        for variant, b in data.get("largest_cube", {}).items():
            print(f"largest cube that trains ({data.get('amp')}), {variant}: {b['edge']}^3 "
                  f"(fails at {b['fails_at']}^3{'' if b['converged'] else ', not converged'})")
        if data.get("skipped"):
            print(f"{name}: not measured within its time: {data['skipped']}")
    for r in (load(folder, "bench_networks_cuda.json") or {}).get("rows", []):
        if r["variant"] != "stock":
            print(f"network {r['network']:<18} {r['edge']:>3}^3 {r['variant']:<18} peak "
                  f"{ratio(r, 'peak_ratio')} saved {ratio(r, 'saved_ratio')} time "
                  f"{ratio(r, 'seconds_ratio')}")
    for r in (load(folder, "bench_augment.json") or {}).get("rows", []):
        print(f"augment {str(tuple(r['shape'])):<20} {r['augment_s'] * 1e3:.1f} ms = "
              f"x{r['augment_over_step']:.2f} of a training step, peak "
              f"{r['augment_peak_over_image']:.1f}x the image")


def main(folder):
    try:
        gpu = open(os.path.join(folder, "gpu.txt")).read().strip()
    except OSError:
        gpu = "?"
    print("\n=== GPU check summary:", gpu)
    for part in (steps, tests, benchmarks):
        try:
            part(folder)
        except Exception as e:  # a malformed file must not hide the rest of the summary
            print(f"({part.__name__}: cannot read: {e!r})")


if __name__ == "__main__":
    main(sys.argv[1])
