"""sdc-runtime serve: endpoints, errors as 4xx JSON, the bounded queue, metrics, a real server
stopped by SIGTERM, and one SdcCodec shared by threads."""
import io
import os
import signal
import struct
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from helpers import KODAK, make_image, recrc
from PIL import Image

from sdc_runtime import SdcCodec, sdc_info

pytest.importorskip("starlette")
from starlette.testclient import TestClient  # noqa: E402

from sdc_bench.serve import launch  # noqa: E402
from sdc_serve import ServeSettings, create_app  # noqa: E402


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def client(model_set):
    app = create_app(SdcCodec(model_set, max_pixels=4 << 20), ServeSettings(workers=2, queue=4, max_body=1 << 20))
    with TestClient(app) as test_client:
        yield test_client


def test_round_trip_info_and_health(client, codec):
    assert client.get("/healthz").json()["status"] == "ok"
    response = client.post("/v1/encode?mode=u8&denoise_steps=1", content=_png(make_image(40, 24)))
    assert response.status_code == 200 and response.headers["content-type"] == "application/x-sdc"
    data = response.content
    assert data == codec.encode(make_image(40, 24), mode="u8", denoise_steps=1)  # the same bytes as the API
    assert client.post("/v1/info", content=data).json() == sdc_info(data)
    for query, headers, fmt in (("?format=webp", {}, "WEBP"), ("", {"Accept": "image/jpeg"}, "JPEG"), ("", {}, "PNG")):
        response = client.post(f"/v1/decode{query}", content=data, headers=headers)
        assert response.status_code == 200
        image = Image.open(io.BytesIO(response.content))
        assert image.format == fmt and image.size == (40, 24)


def _huge_header(data: bytes) -> bytes:
    """A valid file whose header claims 100000 x 100000 pixels."""
    body = bytearray(data)
    struct.pack_into("<IIHHH", body, 12, 100000, 100000, 4, 12500, 12500)
    return recrc(bytes(body))


@pytest.mark.parametrize("route,body,query,status,kind", [
    ("decode", b"garbage bytes", "", 400, "SdcFormatError"),
    ("info", b"\x89SDC\r\n\x1a\n\x01\x00", "", 400, "SdcTruncatedError"),
    ("decode", "huge", "", 413, "SdcLimitError"),
    ("decode", b"x" * ((1 << 20) + 1), "", 413, "SdcLimitError"),
    ("encode", b"not an image at all", "", 415, "SdcInputError"),
    ("encode", "big png", "", 413, "SdcLimitError"),  # the pixel limit: one error, one status (issue 33.7)
    ("compare", "big png", "", 413, "SdcLimitError"),
    ("encode", "png", "?colors=5000", 422, "SdcInputError"),
    ("encode", "png", "?colors=many", 422, "SdcInputError"),
    ("encode", "png", "?speed=80", 422, "SdcInputError"),
    ("encode", "png", "?quality=101", 422, "SdcInputError"),
    ("encode", "png", "?quality=50&target_bytes=9000", 422, "SdcInputError"),
    ("encode", "png", "?target_bytes=100", 422, "SdcTargetError"),
    ("decode", "sdc", "?format=gif", 422, "SdcInputError"),
    ("decode", b"", "", 400, "SdcFormatError"),
])
def test_bad_input_is_a_4xx_with_a_json_body(client, codec, route, body, query, status, kind):
    good = codec.encode(make_image(16, 16), mode="u8")
    body = {"huge": _huge_header(good), "png": _png(make_image(16, 16)), "sdc": good,
            "big png": _png(Image.new("RGB", (3000, 2000)))}.get(body, body)
    response = client.post(f"/v1/{route}{query}", content=body)
    assert response.status_code == status, response.text
    assert response.json()["type"] == kind and response.json()["error"]
    assert "object at 0x" not in response.json()["error"]  # no Python repr (issue 33.8)
    assert client.get("/healthz").status_code == 200  # and the service is fine afterwards


def test_quality_and_target_bytes_reach_the_codec(client, codec):
    png = _png(make_image(40, 24))
    assert client.post("/v1/encode?quality=10", content=png).content == codec.encode(make_image(40, 24), quality=10)
    target = len(codec.encode(make_image(40, 24), quality=1)) + 50
    response = client.post(f"/v1/encode?target_bytes={target}&effort=0", content=png)
    assert response.status_code == 200 and len(response.content) <= target


def test_a_file_for_another_model_set_is_422(client, other_model_set):
    data = SdcCodec(other_model_set).encode(make_image(16, 16))
    response = client.post("/v1/decode", content=data)
    assert response.status_code == 422 and response.json()["type"] == "SdcModelError"


def test_a_full_queue_answers_503_with_retry_after(model_set):
    app = create_app(SdcCodec(model_set), ServeSettings(workers=1, queue=0))
    with TestClient(app) as test_client:
        service = app.state.service
        service.admitted = service.capacity  # every worker and queue slot taken
        response = test_client.post("/v1/encode", content=_png(make_image(16, 16)))
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        service.admitted = 0
        assert test_client.post("/v1/encode", content=_png(make_image(16, 16))).status_code == 200


def test_metrics_count_requests_by_route_and_status(client):
    client.post("/v1/info", content=b"junk")
    text = client.get("/metrics").text
    assert 'sdc_requests_total{route="info",status="400"}' in text
    assert "sdc_request_seconds_bucket" in text and "sdc_queue_depth" in text and "sdc_in_flight" in text


def test_one_codec_shared_by_eight_threads_matches_serial_calls(tae_set):
    """20 encodes and decodes, run serially and then by 8 threads at once on one SdcCodec."""
    codec = SdcCodec(tae_set)
    images = [make_image(24 + i, 16 + i % 5, seed=i) for i in range(20)]

    def round_trip(image):
        data = codec.encode(image)
        return data, np.asarray(codec.decode(data)).tobytes()

    serial = [round_trip(image) for image in images]
    with ThreadPoolExecutor(max_workers=8) as pool:
        threaded = list(pool.map(round_trip, images))
    assert threaded == serial


def test_a_real_server_logs_each_request_and_stops_cleanly_on_sigterm(model_set):
    """uvicorn on 127.0.0.1: one access-log line per request; SIGTERM exits 0."""
    import httpx

    server, base = launch(model_set, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        response = httpx.post(f"{base}/v1/encode", content=_png(make_image(24, 16)), timeout=60)
        assert response.status_code == 200 and response.content[:4] == b"\x89SDC"
    finally:
        server.send_signal(signal.SIGTERM)
        out, err = server.communicate(timeout=60)
    assert server.returncode == 0, err.decode()[-2000:]
    log = out.decode() + err.decode()  # uvicorn: access lines on stdout, the rest on stderr
    assert log.count('"POST /v1/encode HTTP/1.1" 200') == 1 and '"GET /healthz HTTP/1.1" 200' in log


@pytest.mark.skipif(not os.path.isdir(KODAK), reason="../shared/data/kodak is not present")
def test_load_and_abuse_short(tae_set, tmp_path):
    """The short version of sdc-bench serve (the full one is in BENCHMARKS.md): mixed load at
    concurrency 8 with no error, then malformed requests, every one a 4xx, and still healthy."""
    from sdc_bench.cli import main

    out = tmp_path / "serve"
    assert main(["serve", "--models", tae_set, "--images", KODAK, "--requests", "40", "--abuse", "20",
                 "--size", "64", "--out", str(out)]) == 0
    import json

    result = json.loads((out / "serve.json").read_text())
    assert result["errors"] == 0 and result["abuse"] == 20 and not result["abuse_not_4xx"]
    assert result["healthy_after"] and result["peak_rss_mb_abuse"] < 1024


def test_sigterm_lets_the_request_in_flight_finish(model_set):
    """SIGTERM while a decode runs: the client still gets its 200, then the server exits 0."""
    import threading

    import httpx

    data = SdcCodec(model_set).encode(make_image(768, 768), denoise_steps=3)
    server, base = launch(model_set, stderr=subprocess.PIPE)
    try:
        replies = []
        request = threading.Thread(target=lambda: replies.append(
            httpx.post(f"{base}/v1/decode", content=data, timeout=120)))
        request.start()
        time.sleep(0.5)  # the decode (three UNet steps and the decoder at 768²) is under way
        server.send_signal(signal.SIGTERM)
        request.join(timeout=120)
        server.wait(timeout=120)  # one SIGTERM is enough: it finishes the request, then exits
    finally:
        if server.poll() is None:
            server.kill()
    assert replies and replies[0].status_code == 200 and replies[0].content[:8] == b"\x89PNG\r\n\x1a\n"
    assert server.returncode == 0, (server.returncode, server.stderr.read().decode()[-2000:])


def test_a_request_past_the_grace_period_gets_a_json_503_and_no_traceback(model_set):
    """Issue 33.6: SIGTERM during a request longer than --grace: the client gets a JSON 503,
    the log holds no traceback, and the server exits 0 without waiting for the work."""
    import threading

    import httpx

    slow = _png(make_image(1024, 1024))  # effort 9 on a megapixel: many seconds on 2 cores
    server, base = launch(model_set, "--grace", "1", stderr=subprocess.PIPE)
    try:
        replies = []
        request = threading.Thread(target=lambda: replies.append(
            httpx.post(f"{base}/v1/encode?effort=9&quality=90", content=slow, timeout=120)))
        request.start()
        time.sleep(1.0)  # the encode is under way
        stopped = time.monotonic()
        server.send_signal(signal.SIGTERM)
        request.join(timeout=60)
        server.wait(timeout=60)
        took = time.monotonic() - stopped
    finally:
        if server.poll() is None:
            server.kill()
    log = server.stderr.read().decode()
    assert replies and replies[0].status_code == 503, replies and replies[0].text
    assert replies[0].json()["type"] == "ShuttingDown" and "grace period" in replies[0].json()["error"]
    assert server.returncode == 0 and "Traceback" not in log, log[-3000:]
    assert took < 30


def test_unknown_routes_and_methods_answer_json(client):
    """Issue 33.6: Starlette's own 404 and 405 are JSON {"error", "type"} like the codec's."""
    missing = client.get("/v1/nothing-here")
    assert missing.status_code == 404 and missing.json()["type"] == "NotFound" and missing.json()["error"]
    wrong = client.get("/v1/encode")
    assert wrong.status_code == 405 and wrong.json()["type"] == "MethodNotAllowed"


def test_an_unexpected_failure_answers_a_json_500(model_set, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    codec = SdcCodec(model_set)
    monkeypatch.setattr(codec, "decode", broken)
    with TestClient(create_app(codec), raise_server_exceptions=False) as test_client:
        response = test_client.post("/v1/decode", content=SdcCodec(model_set).encode(make_image(16, 16)))
    assert response.status_code == 500 and response.json() == {"error": "internal error", "type": "InternalError"}
