"""deploy/service.py over HTTP: a real uvicorn server (two workers) on loopback, a tiny exported model.

Every bad request gets its status and a JSON body of exactly ``code`` and ``message``, and the
server keeps answering; served recommendations equal the exported model's offline ones; catalog
changes reach every worker and survive a restart.
"""

import base64
import http.client
import io
import json
import time

import pytest
import torch
from PIL import Image

from deploy.service import Problem, Service, Settings
from mmrec.export import load_model
from tests.deploy.helpers import IDS, IT1_TEXT, Server, tiny_export
from tests.models.test_towers import N

LIMITS = {"max_body_bytes": 200_000, "max_image_bytes": 50_000, "max_image_pixels": 250_000, "max_history": 50,
          "max_k": 20, "max_users": 8, "max_items": 4, "max_allowed": 10}


def png(w: int, h: int, mode: str = "RGB", seed: int = 0) -> bytes:
    if mode == "RGB":
        g = torch.Generator().manual_seed(seed)
        img = Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())
    else:
        img = Image.new(mode, (w, h))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("service")
    model_dir = tiny_export(root / "model")
    args = ["--model-dir", str(model_dir), "--state-dir", str(root / "state"), "--workers", "2",
            *[a for k, v in LIMITS.items() for a in ("--limit", f"{k}={v}")]]
    server = Server(args, root / "server.log")
    try:
        server.wait_ready()
        yield {"server": server, "root": root, "args": args, "offline": load_model(model_dir)}
    finally:
        server.stop()


@pytest.fixture
def server(setup):
    srv = setup["server"]
    yield srv
    assert srv.call("GET", "/health")[0] == 200, "the server stopped answering"
    assert srv.proc.poll() is None


def recs(body: dict) -> list[list[tuple[str, float]]]:
    return [[(s["item_id"], s["score"]) for s in r["items"]] for r in body["results"]]


def assert_same(got, expected):
    assert [[i for i, _ in r] for r in got] == [[i for i, _ in r] for r in expected]
    for g, e in zip(got, expected):
        assert [s for _, s in g] == pytest.approx([s for _, s in e], abs=1e-4)


def test_served_recommendations_equal_offline_ones(server, setup):
    offline = setup["offline"]
    histories = [["it1", "it2", "it3"], ["it7"], IDS[:8]]
    status, body = server.call("POST", "/recommend", {"users": [{"history": h} for h in histories], "k": 4})
    assert status == 200 and [r["source"] for r in body["results"]] == ["model"] * 3
    assert_same(recs(body), offline.recommend(histories, k=4))
    # filters: seen items kept, answer restricted to a set
    status, body = server.call("POST", "/recommend", {"k": 3, "users": [
        {"history": ["it1", "it2"], "exclude_seen": False}, {"history": ["it1"], "restrict_to": ["it4", "it5", "it6", "it1"]}]})
    assert status == 200
    expected = offline.rank([["it1", "it2"]], 3, exclude_history=False) + \
        offline.rank([["it1"]], 3, allowed=[["it4", "it5", "it6", "it1"]])
    assert_same(recs(body), [r.pairs() for r in expected])
    assert {i for i, _ in recs(body)[1]} <= {"it4", "it5", "it6"}


def test_empty_history_is_marked_as_popularity(server):
    status, body = server.call("POST", "/recommend", {"users": [{"history": []}, {"history": ["it1"]}], "k": 3})
    assert status == 200
    cold, warm = body["results"]
    assert cold["source"] == "popularity" and warm["source"] == "model"
    assert [(s["item_id"], s["score"]) for s in cold["items"]] == [("it5", 7.0), ("it9", 4.0), ("it2", 1.0)]


def test_history_given_by_content(server, setup):
    """A history entry with it1's text stands for it1 (same vector), but is not a seen catalog item."""
    status, body = server.call("POST", "/recommend", {"k": len(IDS), "users": [
        {"history": [{"text": IT1_TEXT}, "it2"]}, {"history": ["it1", "it2"], "exclude_seen": False}]})
    assert status == 200
    by_content, by_id = recs(body)
    ref = dict(by_id)
    assert [i for i, _ in by_content] == [i for i, _ in by_id if i != "it2"]  # it1 was not seen by id
    assert all(s == pytest.approx(ref[i], abs=1e-4) for i, s in by_content)


def test_service_endpoints_and_openapi(server):
    status, ready = server.call("GET", "/ready")
    assert status == 200 and ready["status"] == "ready"
    status, version = server.call("GET", "/version")
    assert status == 200 and version["domain"] == "shop" and version["exported_items"] == len(IDS)
    assert version["retrieval"] == "exact" and "catalog_version" in version
    status, spec = server.call("GET", "/openapi.json")
    assert status == 200
    assert {"/recommend", "/items", "/items/upload", "/health", "/ready", "/version"} <= set(spec["paths"])


def _is_error(status: int, body, expected_status: int, code: str, text: str) -> None:
    assert status == expected_status, body
    assert isinstance(body, dict) and set(body) == {"code", "message"}, body  # no trace, no extra fields
    assert body["code"] == code and text in body["message"], body
    assert "Traceback" not in body["message"] and "/" not in body["message"].replace("/recommend", "")


@pytest.mark.parametrize("k, text", [(0, "k must be at least 1, got 0"), (-1, "k must be at least 1, got -1"),
                                     (21, "k=21 exceeds the limit of 20 (max_k)")])
def test_bad_k_is_refused_clearly(server, k, text):
    status, body = server.call("POST", "/recommend", {"users": [{"history": ["it1"]}], "k": k})
    _is_error(status, body, 422, "invalid_request" if k < 1 else "limit_exceeded", text)


@pytest.mark.parametrize("payload, status, code, text", [
    ({"users": [{"history": ["it1"] * 51}]}, 422, "limit_exceeded", "history of user 0 has 51 items: 51 exceeds the limit of 50"),
    ({"users": [{"history": []}] * 9}, 422, "limit_exceeded", "9 users: 9 exceeds the limit of 8 (max_users)"),
    ({"users": [{"history": ["ghost"]}]}, 422, "unknown_item", "unknown item id 'ghost'"),
    ({"users": [{"history": ["it1"], "restrict_to": ["nope"]}]}, 422, "unknown_item", "unknown item id 'nope'"),
    ({"users": [{"history": ["it1"], "restrict_to": []}]}, 422, "invalid_request", "restrict_to of user 0 is empty"),
    ({"users": [{"history": ["it1"]}], "k": 2.5}, 422, "invalid_request", "k:"),
    ({"users": [{"history": ["it1"]}], "k": "3"}, 422, "invalid_request", "k:"),
    ({"users": "it1"}, 422, "invalid_request", "users:"),
    ({"history": ["it1"]}, 422, "invalid_request", "users: Field required"),
    ({"users": [{"history": [{"text": "x", "image_path": "/etc/passwd"}]}]}, 422, "invalid_request", "image_path"),
])
def test_bad_requests_get_4xx_and_a_clear_message(server, payload, status, code, text):
    _is_error(*server.call("POST", "/recommend", payload), status, code, text)


def test_malformed_json_and_oversized_bodies(server):
    _is_error(*server.call("POST", "/recommend", b"{not json"), 422, "invalid_request", "JSON")
    big = json.dumps({"users": [{"history": ["it1"]}], "pad": "x" * 300_000}).encode()
    _is_error(*server.call("POST", "/recommend", big), 413, "body_too_large", "200000 bytes (max_body_bytes)")
    # no Content-Length (chunked): counted while it streams in
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/recommend", body=iter([b'{"users": [{"history": ["it1"]}], "pad": "', b"x" * 250_000, b'"}']),
                 headers={"Content-Type": "application/json"}, encode_chunked=True)
    resp = conn.getresponse()
    _is_error(resp.status, json.loads(resp.read()), 413, "body_too_large", "max_body_bytes")
    conn.close()


@pytest.mark.parametrize("image, status, code, text", [
    (png(600, 600, "1"), 413, "limit_exceeded", "600x600 pixels: 360000 exceeds the limit of 250000 (max_image_pixels)"),
    (png(200, 200, seed=3), 413, "limit_exceeded", "exceeds the limit of 50000 (max_image_bytes)"),
    (b"GIF89a but not really an image", 422, "bad_content", "not a readable image"),
    (b"%PDF-1.4 hello", 422, "bad_content", "not a readable image"),
])
def test_bad_images_are_refused_before_decoding(server, image, status, code, text):
    payload = {"items": [{"item_id": "img", "image_base64": base64.b64encode(image).decode()}]}
    _is_error(*server.call("PUT", "/items", payload), status, code, text)
    hist = {"users": [{"history": [{"image_base64": payload["items"][0]["image_base64"]}]}]}
    _is_error(*server.call("POST", "/recommend", hist), status, code, text)


def test_invalid_base64_and_missing_content(server):
    _is_error(*server.call("PUT", "/items", {"items": [{"item_id": "x", "image_base64": "***"}]}), 422, "bad_content",
              "not valid base64")
    _is_error(*server.call("PUT", "/items", {"items": [{"item_id": "x", "text": "  "}]}), 422, "bad_content",
              "'x' has no content this model reads")
    _is_error(*server.call("PUT", "/items", {"items": [{"item_id": f"x{i}", "text": "t"} for i in range(5)]}),
              422, "limit_exceeded", "5 items: 5 exceeds the limit of 4 (max_items)")
    _is_error(*server.call("DELETE", "/items/never-there"), 404, "unknown_item", "never-there")
    _is_error(*server.call("GET", "/nowhere"), 404, "not_found", "Not Found")


def _pids_seen(server, check, attempts: int = 200) -> set[int]:
    """Call ``check`` on fresh connections until two worker processes answered (or attempts run out).
    The kernel hands a new connection to whichever worker accepts first: on a loaded machine one
    worker can take dozens in a row, hence many attempts and a short pause between them."""
    pids = set()
    for _ in range(attempts):
        status, health = server.call("GET", "/health")
        pids.add(health["pid"])
        check()
        if len(pids) >= 2:
            break
        time.sleep(0.02)
    return pids


def test_catalog_changes_reach_every_worker(server, setup):
    """An item added with it1's content scores like it1 for the same history, on every worker."""
    status, body = server.call("PUT", "/items", {"items": [{"item_id": "copy-of-it1", "text": IT1_TEXT}]})
    assert status == 200 and body["created"] == ["copy-of-it1"]

    def check():
        status, body = server.call("POST", "/recommend", {"users": [{"history": ["it2", "it3"]}], "k": 20})
        assert status == 200
        got = dict(recs(body)[0])
        assert got["copy-of-it1"] == pytest.approx(got["it1"], abs=1e-4)

    assert len(_pids_seen(server, check)) == 2
    # an image upload (multipart) is encoded by the model's image path
    boundary = "XyZ"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"item_id\"\r\n\r\nposter\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"p.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + png(40, 40, seed=5) + f"\r\n--{boundary}--\r\n".encode()
    status, body = server.call("POST", "/items/upload", form, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200 and body["created"] == ["poster"], body
    status, body = server.call("POST", "/recommend", {"users": [{"history": ["it2"]}], "k": 20})
    assert "poster" in [i for i, _ in recs(body)[0]]
    # removal: never recommended again, on any worker, but still usable in a history
    assert server.call("DELETE", "/items/it4")[0] == 200

    def check_removed():
        status, body = server.call("POST", "/recommend", {"users": [{"history": ["it4", "it2"]}], "k": 20})
        assert status == 200 and "it4" not in [i for i, _ in recs(body)[0]]

    assert len(_pids_seen(server, check_removed)) == 2
    assert server.call("GET", "/items/it4")[1]["state"] == "removed"


def test_request_deadline_answers_503_and_frees_the_request():
    service = Service(Settings(model_dir="unused", state_dir="unused", timeout_s=0.2))
    import anyio

    async def go():
        t0 = time.monotonic()
        with pytest.raises(Problem) as info:
            await service.run(time.sleep, 2.0)
        return time.monotonic() - t0, info.value

    took, problem = anyio.run(go)
    assert problem.status == 503 and problem.code == "timeout" and took < 1.5


def test_catalog_changes_survive_a_restart(setup):
    """Last in this module: stops the shared server and starts a new one on the same state folder."""
    setup["server"].stop()
    again = Server(setup["args"], setup["root"] / "server2.log")
    try:
        again.wait_ready()
        status, body = again.call("POST", "/recommend", {"users": [{"history": ["it2", "it3"]}], "k": 20})
        ids = [i for i, _ in recs(body)[0]]
        assert status == 200 and "copy-of-it1" in ids and "poster" in ids and "it4" not in ids
        assert again.call("GET", "/items/copy-of-it1")[1]["state"] == "added"
        assert again.call("GET", "/version")[1]["catalog_version"] == 3
    finally:
        again.stop()


# --------------------------------------------------------------------------------------------
# A new champion without downtime


def test_a_new_champion_and_a_rollback_are_served_without_a_restart_or_a_failed_request(tmp_path):
    """Two workers serving ``mmrec-shop@champion`` from the registry with a 0.5 s reload interval:
    a promotion (``mmrec.promotion.record``) and ``python -m deploy.rollback`` reach both workers
    while a client keeps asking; every request of that client is answered 200, and the answers
    are the offline ones of the version ``/version`` names."""
    import threading

    import yaml

    from deploy import rollback
    from deploy.registry import MlflowRegistry
    from mmrec import promotion
    from orchestration import mlflow_support as ms

    uri, name = ms.default_tracking_uri(tmp_path), "mmrec-shop"
    offline = {}
    for seed in (0, 1):
        folder = tiny_export(tmp_path / f"model{seed}", seed=seed)
        with ms.mlflow_run(uri, "shop", "finetune", {"stage": "served_model"}) as tracker:
            version = ms.register_model(uri, folder, name, tracker.run_id, {"gate": "passed"})
        offline[version] = load_model(folder)
    registry = MlflowRegistry(uri)
    promotion.record(registry, name, "1", promotion.Comparison("NDCG@10", {"NDCG@10": 0.1}, None, None, "masked", 3, N))
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(yaml.safe_dump({"root": str(tmp_path), "artifacts": "artifacts", "domains": {
        "shop": {"role": "target", "source": {"format": "tabular", "path": "raw/shop"}}}}))
    history = [IDS[0], IDS[3], IDS[6]]
    expected = {v: m.recommend([history], k=5)[0] for v, m in offline.items()}
    assert [i for i, _ in expected["1"]] != [i for i, _ in expected["2"]]  # the versions can be told apart

    server = Server(["--config", str(cfg), "--workers", "2", "--reload-interval", "0.5"], tmp_path / "server.log")
    answers, stop = [], threading.Event()

    def ask():
        while not stop.is_set():
            answers.append(server.call("POST", "/recommend", {"users": [{"history": history}], "k": 5}, timeout=30))

    def serving(version: str, timeout: float = 90) -> None:
        """Wait until 8 answers in a row (new connections: either worker) name ``version``."""
        deadline, streak = time.monotonic() + timeout, 0
        while streak < 8:
            assert time.monotonic() < deadline, f"still not serving version {version}:\n{server.log.read_text()[-3000:]}"
            status, body = server.call("GET", "/version")
            streak = streak + 1 if status == 200 and body["version"] == version else 0
            time.sleep(0.05 if streak else 0.3)
        status, body = server.call("POST", "/recommend", {"users": [{"history": history}], "k": 5})
        assert status == 200 and recs(body)[0] == [(i, pytest.approx(s, abs=1e-4)) for i, s in expected[version]]

    client = threading.Thread(target=ask)
    try:
        server.wait_ready()
        client.start()
        serving("1")
        d = promotion.record(registry, name, "2", promotion.Comparison(
            "NDCG@10", {"NDCG@10": 0.2}, {"NDCG@10": 0.1}, "1", "masked", 3, N))
        assert d.promoted and d.previous == "1"
        serving("2")
        assert rollback.main(["--config", str(cfg)]) == 0
        assert registry.alias_version(name, "champion") == "1"
        serving("1")
    finally:
        stop.set()
        client.join(timeout=60)
        server.stop()
    assert len(answers) > 20
    assert {status for status, _ in answers} == {200}, [a for a in answers if a[0] != 200][:3]
    sources = {tuple(i for i, _ in recs(body)[0]) for _, body in answers}
    assert sources <= {tuple(i for i, _ in expected[v]) for v in ("1", "2")}
    assert len(sources) == 2  # the client saw both versions, and nothing else
