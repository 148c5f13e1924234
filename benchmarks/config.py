"""Sizes of one benchmark run: `QUICK` (make bench-quick, < 5 min on 2 cores) and `FULL` (make bench)."""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.inputs import ScanSpec

#: Typical clinical head CT: 5 mm axial slices, 0.45 mm pixels (512² matrix over a 230 mm field of view).
CLINICAL_5MM = ScanSpec("head-5mm", (512, 512, 32), (0.45, 0.45, 5.0))
#: The memory test's series from the issue: 512×512×200 thin slices (0.8 mm), as a DICOM zip.
THIN_512x200 = ScanSpec("head-thin", (512, 512, 200), (0.45, 0.45, 0.8))
#: Quick mode's memory series: half the slices (same head coverage at 1.6 mm), to stay under 5 minutes;
#: the summary names the input, and `make bench` measures the full 512×512×200.
THIN_512x100 = ScanSpec("head-thin-half", (512, 512, 100), (0.45, 0.45, 1.6))


@dataclass(frozen=True)
class BenchConfig:
    mode: str
    scan: ScanSpec  # the NIfTI / DICOM scan of the latency, throughput and upload comparisons
    rss_scan: ScanSpec  # the DICOM zip sent 8 at a time for gateway_peak_rss_mb
    c1_requests: int  # sequential requests per path for gateway_overhead_ratio
    throughput_concurrency: int
    # per round and per path: a round starts 8 at once and drains to none, so a short round measures
    # more of its ramps than of the steady state; 6-8x the concurrency keeps those to a small share
    throughput_requests: int
    throughput_rounds: int  # paths are interleaved round by round (noise hits them alike)
    sweep: tuple[int, ...]  # extra concurrencies for the batching on/off curves (beyond 1 and 8)
    sweep_requests_per_client: int
    upload_requests: int
    lane_probes: int  # STAT scans per phase of the priority-lane measurement (benchmarks/lanes.py)
    rss_concurrency: int = 8


QUICK = BenchConfig(
    mode="quick",
    scan=CLINICAL_5MM,
    rss_scan=THIN_512x100,
    c1_requests=20,
    throughput_concurrency=8,
    throughput_requests=48,
    throughput_rounds=4,
    sweep=(),
    sweep_requests_per_client=0,
    upload_requests=2,
    lane_probes=8,
)

FULL = BenchConfig(
    mode="full",
    scan=CLINICAL_5MM,
    rss_scan=THIN_512x200,
    c1_requests=40,
    throughput_concurrency=8,
    throughput_requests=64,
    throughput_rounds=4,
    sweep=(2, 4, 12, 16),
    sweep_requests_per_client=3,
    upload_requests=5,
    lane_probes=20,
)
