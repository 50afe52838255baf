"""data/download.py and the two downloaders, against a local HTTP server (no network).
weights.fetch does the downloading; its own tests cover it in depth, these check the dataset side."""
import http.server
import io
import json
import os
import threading
import zipfile

import pytest
from PIL import Image

import data.coco as coco
import data.scienceqa as scienceqa
from data.batch import DataError
from data.download import fetch, unzip

DEAD = "http://127.0.0.1:9"  # nothing listens there: what an offline machine sees


class Server(http.server.BaseHTTPRequestHandler):
    files, seen, honour_range = {}, [], True

    def do_GET(self):
        body = self.files.get(self.path)
        if body is None:
            return self.send_error(404)
        asked = self.headers.get("Range")
        self.seen.append((self.path, asked))
        start = int(asked.split("=")[1].rstrip("-")) if asked and self.honour_range else 0
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    Server.files, Server.seen, Server.honour_range = {}, [], True
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Server)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def zip_bytes(files):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def png(rgb):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), rgb).save(buf, format="PNG")
    return buf.getvalue()


def test_fetch_resumes_restarts_and_fails_clearly(server, tmp_path):
    body = os.urandom(300_000)
    Server.files["/big.bin"] = body
    dest = str(tmp_path / "big.bin")
    with open(dest + ".part", "wb") as f:
        f.write(body[:1000])  # an interrupted earlier run
    fetch(f"{server}/big.bin", dest)
    assert open(dest, "rb").read() == body and not os.path.exists(dest + ".part")
    assert Server.seen == [("/big.bin", "bytes=1000-")]
    Server.honour_range = False  # a server without ranges: start again from 0
    dest2 = str(tmp_path / "again.bin")
    with open(dest2 + ".part", "wb") as f:
        f.write(b"stale bytes")
    fetch(f"{server}/big.bin", dest2)
    assert open(dest2, "rb").read() == body
    with pytest.raises(DataError, match=rf"could not download {server}/missing.json \(HTTP 404\).*: "
                                        rf"{server}/missing.json -> {tmp_path}/x.json$"):
        fetch(f"{server}/missing.json", str(tmp_path / "x.json"))
    with pytest.raises(DataError, match=rf"could not download {DEAD}/a.zip .*offline.*needs: {DEAD}/a.zip -> .*a.zip$"):
        fetch(f"{DEAD}/a.zip", str(tmp_path / "a.zip"))
    assert not os.path.exists(tmp_path / "x.json") and not os.path.exists(tmp_path / "a.zip")


def test_unzip_is_all_or_nothing(tmp_path):
    z = tmp_path / "t.zip"
    z.write_bytes(zip_bytes({"train/1/image.png": b"x"}))
    assert open(unzip(str(z), str(tmp_path / "images"), "train") + "/1/image.png", "rb").read() == b"x"
    z.write_bytes(zip_bytes({"7/image.png": b"y"}))  # no top folder: the files go under name/
    assert os.path.isfile(os.path.join(unzip(str(z), str(tmp_path / "images"), "val"), "7", "image.png"))
    z.write_bytes(zip_bytes({"test/1/image.png": b"z" * 1000})[:300])  # cut short
    with pytest.raises(DataError, match=r"t.zip is not a complete zip file"):
        unzip(str(z), str(tmp_path / "images"), "test")
    assert sorted(os.listdir(tmp_path / "images")) == ["train", "val"]


def test_scienceqa_download_end_to_end(server, tmp_path, monkeypatch, capsys):
    problems = {str(i): {"question": f"Q{i}?", "choices": ["a", "b"], "answer": 1, "hint": "", "split": split,
                         "image": "image.png" if i != 2 else None, "subject": "natural science", "grade": "grade3"}
                for i, split in ((1, "train"), (2, "val"), (3, "test"))}
    Server.files.update({"/problems.json": json.dumps(problems).encode(),
                         "/pid_splits.json": json.dumps({"train": ["1"], "val": ["2"], "test": ["3"]}).encode(),
                         "/train.zip": zip_bytes({"train/1/image.png": png((1, 2, 3))}),
                         "/val.zip": zip_bytes({}),
                         "/test.zip": zip_bytes({"3/image.png": png((4, 5, 6))})})
    monkeypatch.setattr(scienceqa, "URLS", {name: f"{server}/{name}" for name in scienceqa.URLS})
    monkeypatch.setattr(scienceqa, "SIZES", {"train": 1, "val": 1, "test": 1})
    root = str(tmp_path / "sqa")
    scienceqa.main(["--download", "--data_dir", root])
    assert "ScienceQA test: 1 problems, all images present" in capsys.readouterr().out
    assert load_ok(root) and not [f for f in os.listdir(os.path.join(root, "images")) if f.endswith(".zip")]
    monkeypatch.setattr(scienceqa, "URLS", {name: f"{DEAD}/{name}" for name in scienceqa.URLS})
    scienceqa.download(root)  # all there already: nothing is fetched, so no network is needed
    monkeypatch.setattr(scienceqa, "SIZES", {"train": 2, "val": 1, "test": 1})
    with pytest.raises(SystemExit):
        scienceqa.main(["--data_dir", root])
    assert "ScienceQA train has 1 problems" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        scienceqa.main(["--download", "--data_dir", str(tmp_path / "offline")])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"could not download {DEAD}/problems.json" in err and "offline/problems.json" in err
    assert f"{DEAD}/test.zip -> {tmp_path}/offline/images/test.zip" in err  # every file, and where it goes


def load_ok(root):
    return [ex.image is not None for ex in scienceqa.load_scienceqa(root, "test")] == [True]


def test_coco_download_end_to_end(server, tmp_path, monkeypatch):
    karpathy = {"images": [
        {"filepath": "train2014", "filename": "a.jpg", "split": "train", "cocoid": 1, "sentences": [{"raw": "A cat."}]},
        {"filepath": "val2014", "filename": "b.jpg", "split": "val", "cocoid": 2, "sentences": [{"raw": "A dog."}]},
        {"filepath": "val2014", "filename": "c.jpg", "split": "test", "cocoid": 3, "sentences": [{"raw": "A cow."}]}]}
    Server.files.update({"/caption_datasets.zip": zip_bytes({"dataset_coco.json": json.dumps(karpathy),
                                                             "dataset_flickr8k.json": "{}"}),
                         "/train2014.zip": zip_bytes({"train2014/a.jpg": png((0, 0, 0))}),
                         "/val2014.zip": zip_bytes({"val2014/b.jpg": png((1, 1, 1)), "val2014/c.jpg": png((2, 2, 2))})})
    monkeypatch.setattr(coco, "URLS", {name: f"{server}/{name}" for name in coco.URLS})
    monkeypatch.setattr(coco, "SIZES", {"train": 1, "val": 1, "test": 1})
    root = str(tmp_path / "coco")
    coco.download(root)
    assert sorted(os.listdir(root)) == ["dataset_coco.json", "train2014", "val2014"]
    assert coco.references(coco.load_coco(root, "test")) == {"3": ["a cow."]}
