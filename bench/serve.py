"""sdc-bench serve: load and abuse a real `sdc-runtime serve` on 127.0.0.1.

Load: --requests mixed encode/decode requests of small Kodak crops at --concurrency, against a
serial loop of the same SdcCodec calls in this process (same run).  Abuse: --abuse malformed
requests (garbage, truncated .sdc, a header claiming 10^10 pixels, a body over the limit,
slow clients trickling garbage); each must get a 4xx, and the server must stay healthy.
Reports p50/p99 latency, throughput and the server's peak RSS (VmHWM).  Bounded in count and
time, and only ever on 127.0.0.1.
"""
from __future__ import annotations

import io
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

from .timing import machine

MAX_BODY = 1 << 20


def launch(models: str, *args: str, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL):
    """Start `sdc-runtime serve` on a free port of 127.0.0.1 and wait until /healthz answers.
    Returns (process, base URL)."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "sdc_runtime.cli", "serve", "--models", models,
                               "--port", str(port), *args], stdout=stdout, stderr=stderr)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(f"{base}/healthz", timeout=2)
            return server, base
        except httpx.TransportError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("the server did not start") from None
            time.sleep(0.2)


def _peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM")) / 1024


def _crops(folder: str, count: int, side: int) -> list[bytes]:
    import glob

    from PIL import Image

    crops = []
    for path in sorted(glob.glob(os.path.join(folder, "*.png")))[:count]:
        buffer = io.BytesIO()
        Image.open(path).convert("RGB").crop((0, 0, side, side)).save(buffer, "PNG")
        crops.append(buffer.getvalue())
    return crops


def _slow_client(port: int, body: bytes, pause: float) -> int:
    """Send a request whose body trickles in, a few bytes at a time; return the status."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST /v1/decode HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n"
                     b"Connection: close\r\n\r\n" % len(body))
        for i in range(0, len(body), 4):
            sock.sendall(body[i:i + 4])
            time.sleep(pause)
        reply = sock.recv(64)
    return int(reply.split()[1])


def _abusive_bodies(valid_sdc: bytes) -> list[tuple[str, str, bytes]]:
    body = bytearray(valid_sdc)
    struct.pack_into("<IIHHH", body, 12, 100000, 100000, body[20] | body[21] << 8, 12500, 12500)
    huge = bytes(body[:-4]) + zlib.crc32(bytes(body[:-4])).to_bytes(4, "little")
    return [("garbage", "decode", os.urandom(256)), ("truncated", "decode", valid_sdc[: len(valid_sdc) // 2]),
            ("10^10 pixels", "decode", huge), ("over the body limit", "decode", b"x" * (MAX_BODY + 1)),
            ("not an image", "encode", b"GIF89a" + os.urandom(64)), ("bad options", "encode?colors=99999", b"x")]


def run(args) -> dict:
    import httpx
    from PIL import Image

    from sdc_runtime import SdcCodec

    crops = _crops(args.images, 4, args.size)
    codec = SdcCodec(args.models)
    sdc_files = [codec.encode(Image.open(io.BytesIO(c))) for c in crops]
    jobs = [("encode", crops[i % len(crops)]) if i % 2 == 0 else ("decode", sdc_files[i % len(sdc_files)])
            for i in range(args.requests)]
    server, base = launch(args.models, "--workers", str(args.workers), "--queue", "64", "--max-body", str(MAX_BODY))
    port = int(base.rsplit(":", 1)[1])
    try:
        with httpx.Client(timeout=120) as client:
            def one(job):
                started = time.perf_counter()
                response = client.post(f"{base}/v1/{job[0]}", content=job[1])
                return response.status_code, time.perf_counter() - started

            one(jobs[0])  # warm-up: sessions open
            started = time.perf_counter()
            with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
                results = list(pool.map(one, jobs))
            load_seconds = time.perf_counter() - started
            rss_after_load = _peak_rss_mb(server.pid)
            abuse = []
            bodies = _abusive_bodies(sdc_files[0])
            for i in range(args.abuse):
                name, route, body = bodies[i % len(bodies)]
                if i % 10 == 9:
                    name, status = "slow client", _slow_client(port, os.urandom(40), 0.02)
                else:
                    status = client.post(f"{base}/v1/{route}", content=body).status_code
                abuse.append((name, status))
            healthy = client.get(f"{base}/healthz").status_code == 200
        rss_after_abuse = _peak_rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=60)
    # The same calls serially, in this process, for the throughput ratio.
    started = time.perf_counter()
    for kind, body in jobs:
        codec.encode(Image.open(io.BytesIO(body))) if kind == "encode" else codec.decode(body).save(io.BytesIO(), "PNG")
    serial_seconds = time.perf_counter() - started
    latencies = sorted(seconds for _, seconds in results)
    return {
        "machine": machine(), "models": os.path.abspath(args.models), "requests": len(jobs),
        "concurrency": args.concurrency, "workers": args.workers, "size": args.size,
        "errors": sum(status != 200 for status, _ in results),
        "p50_ms": 1e3 * statistics.median(latencies), "p99_ms": 1e3 * latencies[int(0.99 * (len(latencies) - 1))],
        "throughput_rps": len(jobs) / load_seconds, "serial_rps": len(jobs) / serial_seconds,
        "peak_rss_mb_load": rss_after_load, "peak_rss_mb_abuse": rss_after_abuse,
        "abuse": len(abuse), "abuse_not_4xx": [a for a in abuse if not 400 <= a[1] < 500],
        "abuse_statuses": sorted({f"{name}: {status}" for name, status in abuse}), "healthy_after": healthy,
        "server_exit": server.returncode,
    }


def markdown(r: dict) -> str:
    return "\n".join([
        f"Machine: {r['machine']}; {r['requests']} requests ({r['size']}² Kodak crops, half encode, half decode)"
        f" at concurrency {r['concurrency']}, {r['workers']} workers.", "",
        "| errors | p50 | p99 | throughput | serial SdcCodec loop, same run | ratio | peak RSS (load / after abuse) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| {r['errors']} | {r['p50_ms']:.0f} ms | {r['p99_ms']:.0f} ms | {r['throughput_rps']:.1f} req/s |"
        f" {r['serial_rps']:.1f} req/s | {r['throughput_rps'] / r['serial_rps']:.2f} |"
        f" {r['peak_rss_mb_load']:.0f} / {r['peak_rss_mb_abuse']:.0f} MB |", "",
        f"Abuse: {r['abuse']} malformed requests, {len(r['abuse_not_4xx'])} not answered with a 4xx;"
        f" healthy afterwards: {r['healthy_after']}. Answers: {'; '.join(r['abuse_statuses'])}."])


def add_parser(sub):
    p = sub.add_parser("serve", help="load and abuse a real sdc-runtime serve on 127.0.0.1")
    p.add_argument("--models", required=True)
    p.add_argument("--images", required=True, help="folder of PNG images (e.g. Kodak)")
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--abuse", type=int, default=100)
    p.add_argument("--size", type=int, default=128, help="side of the square crops")
    p.add_argument("--out", default="bench-out/serve")
    p.set_defaults(run=_main)


def _main(args) -> int:
    os.makedirs(args.out, exist_ok=True)
    result = run(args)
    with open(os.path.join(args.out, "serve.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    print(markdown(result))
    return 0 if not result["errors"] and not result["abuse_not_4xx"] and result["healthy_after"] else 1
