"""Tests for fastnn.data: download, cache, errors and the classic split.

Everything runs offline against a tiny archive in the official format, served
from a local HTTP server; no test touches the real cache or the network.
"""
import functools
import hashlib
import http.server
import io
import os
import pickle
import socket
import tarfile
import threading
import types

import numpy as np
import pytest

import fastnn.data as data

N_PER_BATCH = 20
FOLDER = "cifar-10-batches-py"
BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def _md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def _write_tar(path, files):
    """Write a tar.gz holding ``files``: {member name: bytes}."""
    with tarfile.open(path, "w:gz") as tar:
        dirinfo = tarfile.TarInfo(FOLDER)
        dirinfo.type, dirinfo.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(dirinfo)
        for name, payload in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(payload), 0o644
            tar.addfile(info, io.BytesIO(payload))


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """A tiny CIFAR-10 archive in the official layout, with what it holds."""
    rng = np.random.default_rng(0)
    srv = tmp_path_factory.mktemp("srv")
    raw, files = {}, {}
    for name in BATCHES:
        x = rng.integers(0, 256, size=(N_PER_BATCH, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, size=N_PER_BATCH)]
        raw[name] = (x, y)
        batch = {b"batch_label": name.encode(), b"labels": y, b"data": x,
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(N_PER_BATCH)]}
        files[f"{FOLDER}/{name}"] = pickle.dumps(batch, protocol=2)
    meta = {b"label_names": [c.encode() for c in data.CLASSES],
            b"num_cases_per_batch": N_PER_BATCH, b"num_vis": 3072}
    files[f"{FOLDER}/batches.meta"] = pickle.dumps(meta, protocol=2)
    path = srv / "cifar-10-python.tar.gz"
    _write_tar(path, files)
    return types.SimpleNamespace(
        dir=srv, path=path, name=path.name, md5=_md5(path), files=files,
        train_data=np.concatenate([raw[n][0] for n in BATCHES[:5]]),
        train_labels=np.concatenate([raw[n][1] for n in BATCHES[:5]]),
        test_data=raw["test_batch"][0], test_labels=np.array(raw["test_batch"][1]))


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def serve():
    """serve(handler) -> base URL of a server on 127.0.0.1, shut down afterwards."""
    servers = []

    def start(handler):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def served(archive, serve):
    """URL of the tiny archive on a local server."""
    base = serve(functools.partial(_QuietHandler, directory=str(archive.dir)))
    return f"{base}/{archive.name}"


def _closed_port_url():
    # Bind then release a port: nothing listens there, so connecting is refused.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/cifar-10-python.tar.gz"


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """Keep every test away from the real cache, proxies and long timeouts."""
    monkeypatch.delenv("FASTNN_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY",
                "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setattr(data, "_TIMEOUT_S", 5)


def _populate(root, archive):
    """Unpack the tiny archive into root, as a previous download would have."""
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive.path) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(root, filter="data")
        else:
            tar.extractall(root)
    return root


def _check_loaded(out, archive):
    X_train, y_train, X_test, y_test = out
    assert X_train.shape == (5 * N_PER_BATCH, 32, 32, 3) and X_train.dtype == np.uint8
    assert X_test.shape == (N_PER_BATCH, 32, 32, 3) and X_test.dtype == np.uint8
    assert y_train.shape == (5 * N_PER_BATCH,) and y_train.dtype == np.int64
    assert y_test.shape == (N_PER_BATCH,) and y_test.dtype == np.int64
    np.testing.assert_array_equal(y_train, archive.train_labels)
    np.testing.assert_array_equal(y_test, archive.test_labels)
    # Rows are R, G, B planes of 1024 pixels each, row-major within a plane.
    raw = archive.train_data
    for i, r, c in [(0, 0, 0), (7, 1, 2), (99, 31, 30), (42, 17, 5)]:
        for ch in range(3):
            assert X_train[i, r, c, ch] == raw[i, ch * 1024 + r * 32 + c]
    np.testing.assert_array_equal(
        X_train, raw.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(
        X_test, archive.test_data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def test_first_download_then_cache_without_network(tmp_path, archive, served):
    root = tmp_path / "root"
    _check_loaded(data.load_cifar10(root, url=served, md5=archive.md5), archive)
    # Only the final folder remains: no temp archive, no unpack folder.
    assert os.listdir(root) == [FOLDER]
    assert sorted(os.listdir(root / FOLDER)) == sorted(BATCHES + ["batches.meta"])
    # A second call must not touch the network at all.
    _check_loaded(data.load_cifar10(root, url=_closed_port_url(), md5=archive.md5),
                  archive)
    _check_loaded(data.load_cifar10(str(root), download=False), archive)


def test_md5_mismatch_leaves_nothing(tmp_path, archive, served):
    root = tmp_path / "root"
    wrong = "0" * 32
    with pytest.raises(ValueError) as info:
        data.load_cifar10(root, url=served, md5=wrong)
    msg = str(info.value)
    assert wrong in msg and archive.md5 in msg and served in msg
    assert not root.exists()  # the data folder it made for the download is gone too


class _TruncatingHandler(http.server.BaseHTTPRequestHandler):
    """Promises more bytes than it sends, then hangs up."""
    payload = b""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/gzip")
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        self.wfile.write(self.payload[: len(self.payload) // 2])
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):
        pass


def test_interrupted_transfer_leaves_nothing(tmp_path, archive, serve):
    handler = type("H", (_TruncatingHandler,), {"payload": archive.path.read_bytes()})
    url = serve(handler) + "/" + archive.name
    root = tmp_path / "root"
    with pytest.raises(RuntimeError) as info:
        data.load_cifar10(root, url=url, md5=archive.md5)
    assert "interrupted" in str(info.value) and url in str(info.value)
    assert not root.exists()  # the data folder it made for the download is gone too


def test_no_network_message(tmp_path):
    url = _closed_port_url()
    root = tmp_path / "root"
    with pytest.raises(RuntimeError) as info:
        data.load_cifar10(root, url=url)
    msg = str(info.value)
    assert url in msg and str(root / FOLDER) in msg and "FASTNN_DATA" in msg
    assert not root.exists()  # the data folder it made for the download is gone too


def test_a_given_folder_that_does_not_exist_is_named(tmp_path, monkeypatch):
    """--data /nonexistent (root= or FASTNN_DATA): "no such folder", not just a failed download."""
    url, missing = _closed_port_url(), tmp_path / "no" / "such"
    with pytest.raises(RuntimeError, match=f"no such folder: the CIFAR-10 data folder {missing} "
                                           f"does not exist \\(looked for {missing / FOLDER}") as info:
        data.load_cifar10(missing, url=url)
    assert url in str(info.value) and "--data" in str(info.value)
    monkeypatch.setenv("FASTNN_DATA", str(missing))
    with pytest.raises(RuntimeError, match=f"no such folder.*{missing}"):
        data.load_cifar10(url=url)
    with pytest.raises(FileNotFoundError, match=f"no such folder: {missing} does not exist"):
        data.load_cifar10(download=False)
    assert not missing.exists() and not missing.parent.exists()


def test_http_error_is_reported(tmp_path, archive, serve):
    base = serve(functools.partial(_QuietHandler, directory=str(archive.dir)))
    url = base + "/missing.tar.gz"
    with pytest.raises(RuntimeError, match="404"):
        data.load_cifar10(tmp_path / "root", url=url)
    assert not (tmp_path / "root").exists()


def test_path_traversal_is_refused(tmp_path, archive, serve):
    srv = tmp_path / "srv"
    srv.mkdir()
    evil = dict(archive.files)
    evil[f"{FOLDER}/../../evil.txt"] = b"gotcha"
    _write_tar(srv / "evil.tar.gz", evil)
    url = serve(functools.partial(_QuietHandler, directory=str(srv))) + "/evil.tar.gz"
    root = tmp_path / "a" / "root"
    with pytest.raises(ValueError, match="evil.txt"):
        data.load_cifar10(root, url=url, md5=None)
    assert not root.exists()  # the data folder it made for the download is gone too
    assert not list(tmp_path.rglob("evil.txt"))


def test_download_false_missing(tmp_path):
    root = tmp_path / "nothing"
    with pytest.raises(FileNotFoundError) as info:
        data.load_cifar10(root, download=False)
    msg = str(info.value)
    assert str(root / FOLDER) in msg and "FASTNN_DATA" in msg
    assert not root.exists()


def test_the_archive_copied_into_the_data_folder_is_used_offline(tmp_path, archive):
    root = tmp_path / "root"
    root.mkdir()
    (root / data.ARCHIVE).write_bytes(archive.path.read_bytes())
    X_train, y_train, _, _ = data.load_cifar10(root, url=_closed_port_url(), md5=archive.md5)
    np.testing.assert_array_equal(y_train, archive.train_labels)
    assert sorted(os.listdir(root)) == sorted([data.ARCHIVE, FOLDER])


def test_a_wrong_archive_in_the_data_folder_is_named(tmp_path, archive):
    root = tmp_path / "root"
    root.mkdir()
    (root / data.ARCHIVE).write_bytes(archive.path.read_bytes())
    with pytest.raises(ValueError, match=f"{data.ARCHIVE} has MD5"):
        data.load_cifar10(root, md5="0" * 32)
    assert os.listdir(root) == [data.ARCHIVE]


def test_root_may_be_the_batches_folder_itself(tmp_path, archive):
    root = _populate(tmp_path / "root", archive)
    _, y_train, _, _ = data.load_cifar10(root / FOLDER, download=False)
    np.testing.assert_array_equal(y_train, archive.train_labels)


def test_a_missing_batch_and_a_file_as_root_are_named(tmp_path, archive):
    root = _populate(tmp_path / "root", archive)
    (root / FOLDER / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3 is missing.*official archive"):
        data.load_cifar10(root, download=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="is a file"):
        data.load_cifar10(tmp_path / "file")


def _pickled(obj):
    return pickle.dumps(obj, protocol=2)


@pytest.mark.parametrize("corrupt", [
    pytest.param(lambda b: b[: len(b) // 2], id="truncated"),
    pytest.param(lambda b: b"", id="empty"),
    pytest.param(lambda b: b"not a pickle at all", id="garbage"),
    pytest.param(lambda b: _pickled({b"labels": [0] * 20}), id="no-data-key"),
    pytest.param(lambda b: _pickled({b"data": np.zeros((20, 100), np.uint8),
                                     b"labels": [0] * 20}), id="wrong-shape"),
    pytest.param(lambda b: _pickled({b"data": np.zeros((20, 3072), np.uint8),
                                     b"labels": [0] * 19}), id="label-count"),
])
def test_corrupt_batch_names_the_file(tmp_path, archive, corrupt):
    root = _populate(tmp_path / "root", archive)
    bad = root / FOLDER / "data_batch_3"
    bad.write_bytes(corrupt(bad.read_bytes()))
    with pytest.raises(ValueError) as info:
        data.load_cifar10(root, download=False)
    assert str(bad) in str(info.value)
    assert "official archive" in str(info.value) and "download it again" not in str(info.value)


def test_root_defaults_to_env_then_xdg(tmp_path, archive, monkeypatch):
    xdg_folder = tmp_path / "xdg-cache" / "fastnn" / FOLDER
    assert data.default_root() == str(tmp_path / "xdg-cache" / "fastnn")
    with pytest.raises(FileNotFoundError, match=str(xdg_folder)):
        data.load_cifar10(download=False)
    # Read at call time: setting the variable after import takes effect.
    root = _populate(tmp_path / "custom", archive)
    monkeypatch.setenv("FASTNN_DATA", str(root))
    _check_loaded(data.load_cifar10(download=False), archive)
    _check_loaded(data.load_cifar10(url=_closed_port_url()), archive)


def test_get_cifar10_data_split_and_mean(tmp_path, archive):
    root = _populate(tmp_path / "root", archive)
    out = data.get_cifar10_data(num_training=70, num_validation=20, num_test=10,
                                root=root)
    assert sorted(out) == sorted(["X_train", "y_train", "X_val", "y_val",
                                  "X_test", "y_test"])
    for key, n in (("train", 70), ("val", 20), ("test", 10)):
        assert out[f"X_{key}"].shape == (n, 3, 32, 32)
        assert out[f"X_{key}"].dtype == np.float32
        assert out[f"y_{key}"].shape == (n,) and out[f"y_{key}"].dtype == np.int64

    chw = lambda raw: raw.reshape(-1, 3, 32, 32).astype(np.float64)  # noqa: E731
    train_all = chw(archive.train_data)
    mean = train_all[:70].mean(axis=0)
    np.testing.assert_allclose(out["X_train"], train_all[:70] - mean, atol=1e-4)
    np.testing.assert_allclose(out["X_val"], train_all[70:90] - mean, atol=1e-4)
    np.testing.assert_allclose(out["X_test"], chw(archive.test_data)[:10] - mean,
                               atol=1e-4)
    np.testing.assert_allclose(out["X_train"].mean(axis=0), 0, atol=1e-3)
    np.testing.assert_array_equal(out["y_train"], archive.train_labels[:70])
    np.testing.assert_array_equal(out["y_val"], archive.train_labels[70:90])
    np.testing.assert_array_equal(out["y_test"], archive.test_labels[:10])

    raw = data.get_cifar10_data(num_training=70, num_validation=20, num_test=10,
                                subtract_mean=False, root=root)
    np.testing.assert_array_equal(raw["X_val"], train_all[70:90])
    np.testing.assert_array_equal(raw["X_test"], chw(archive.test_data)[:10])


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_training=90, num_validation=11), "101"),
    (dict(num_training=10, num_validation=5, num_test=21), "num_test"),
    (dict(num_training=-1), "num_training"),
    (dict(num_training=0), "subtract_mean"),
])
def test_get_cifar10_data_rejects_bad_sizes(tmp_path, archive, kwargs, match):
    root = _populate(tmp_path / "root", archive)
    kwargs = dict(dict(num_validation=0, num_test=0), **kwargs)
    with pytest.raises(ValueError, match=match):
        data.get_cifar10_data(root=root, **kwargs)


def test_get_cifar10_data_takes_numpy_integer_sizes_exactly(tmp_path, archive):
    """Sizes become Python ints first: numpy integers neither wrap nor shift the split."""
    root = _populate(tmp_path / "root", archive)
    out = data.get_cifar10_data(num_training=np.int8(70), num_validation=np.uint16(20),
                                num_test=np.int64(10), root=root)
    assert [len(out[k]) for k in ("X_train", "X_val", "X_test")] == [70, 20, 10]
    np.testing.assert_array_equal(out["y_val"], archive.train_labels[70:90])
    # np.int8(90) + np.int8(90) wraps to -76, which would pass the size check
    with pytest.raises(ValueError, match=r"90 \+ 90 = 180 exceeds the 100"):
        data.get_cifar10_data(num_training=np.int8(90), num_validation=np.int8(90), root=root)
    with pytest.raises(ValueError, match="18446744073709551615"):
        data.get_cifar10_data(num_training=10, num_validation=np.uint64(2**64 - 1), root=root)


@pytest.mark.parametrize("value", [2.5, 70.0, "3", True, None])
def test_get_cifar10_data_refuses_sizes_that_are_not_integers(tmp_path, archive, value):
    root = _populate(tmp_path / "root", archive)
    with pytest.raises(TypeError, match=f"num_validation must be an integer, got.*{value!r}"):
        data.get_cifar10_data(num_training=10, num_validation=value, root=root)


def test_aliases_and_classes():
    assert data.load_CIFAR10 is data.load_cifar10
    assert data.get_CIFAR10_data is data.get_cifar10_data
    assert data.CLASSES == ("airplane", "automobile", "bird", "cat", "deer",
                            "dog", "frog", "horse", "ship", "truck")
    assert data.URL == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    assert data.MD5 == "c58f30108f718f92721af3b95e74349a"


def test_batches_pickled_by_python3_code_load(tmp_path):
    """A folder written the Python 3 way (str keys, int64 pixels), as course code and tests
    often make one, reads like the official bytes-keyed uint8 files."""
    rng = np.random.default_rng(3)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, size=(4, 3072))  # int64
        y = [int(v) for v in rng.integers(0, 10, size=4)]
        written[name] = (x, y)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": x, "labels": y}, f)
    X_train, y_train, X_test, y_test = data.load_cifar10(tmp_path, download=False)
    assert X_train.dtype == np.uint8 and X_train.shape == (20, 32, 32, 3)
    np.testing.assert_array_equal(
        X_test, written["test_batch"][0].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(y_train, np.concatenate(
        [written[f"data_batch_{i}"][1] for i in range(1, 6)]))
