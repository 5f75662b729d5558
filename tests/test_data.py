import io
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from cgd import CGDError, data
from cgd.data import Dataset, ImageSet, load_dataset, save_npz


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CGD_CACHE", str(tmp_path / "cache"))


def test_npz_round_trip(tmp_path, tiny):
    save_npz(tiny, tmp_path / "d.npz")
    ds = load_dataset(tmp_path / "d.npz")
    assert (ds.train.images == tiny.train.images).all() and ds.class_names == tiny.class_names


def _npz(path, **over):
    rng = np.random.default_rng(0)
    arrays = dict(x_train=rng.integers(0, 255, (8, 8, 8, 3), dtype=np.uint8), y_train=np.arange(8) % 2,
                  x_test=rng.integers(0, 255, (4, 8, 8, 3), dtype=np.uint8), y_test=np.arange(4) % 2,
                  class_names=np.array(["a", "b"]))
    arrays.update(over)
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("over, message", [
    ({"y_train": np.arange(8) % 3}, r"labels must lie in 0..1"),
    ({"class_names": np.array(["a", "b", "c"])[:1]}, r"labels must lie in 0..0"),
    ({"x_train": np.zeros((8, 8, 8), np.uint8)}, r"shape \(N, H, W, 3\)"),
    ({"x_train": np.zeros((8, 8, 8, 3), np.float32)}, "must be uint8"),
    ({"y_train": np.arange(7) % 2}, "one label per image"),
])
def test_bad_npz_gets_one_clear_error(tmp_path, over, message):
    with pytest.raises(CGDError, match=message):
        load_dataset(_npz(tmp_path / "bad.npz", **over))


def test_npz_missing_arrays_and_pickles_refused(tmp_path):
    np.savez(tmp_path / "m.npz", x_train=np.zeros((1, 2, 2, 3), np.uint8))
    with pytest.raises(CGDError, match="missing arrays"):
        load_dataset(tmp_path / "m.npz")
    np.savez(tmp_path / "p.npz", x_train=np.array([object()], dtype=object), y_train=[0], x_test=[0], y_test=[0],
             class_names=["a"])
    with pytest.raises(CGDError, match="pickled"):
        load_dataset(tmp_path / "p.npz")


def _jpeg(rgb):
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), rgb, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _tar(path, files):
    with tarfile.open(path, "w:gz") as tf:
        for name, payload in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    return path


def test_jpeg_tarball_and_corrupt_image(tmp_path):
    files = {f"{split}/{c}/{i:04d}.jpg": _jpeg((200 * (c == "cat"), 0, 0))
             for split in ("train", "test") for c in ("cat", "dog") for i in range(3)}
    ds = load_dataset(_tar(tmp_path / "imgs.tar.gz", files))
    assert ds.class_names == ["cat", "dog"] and len(ds.train) == 6 and ds.train.images.shape == (6, 8, 8, 3)
    assert ds.train.images[ds.train.labels == 0, ..., 0].mean() > 150  # cat images are the red ones
    files["train/cat/0001.jpg"] = b"not a jpeg"
    with pytest.raises(CGDError, match="corrupt image .*train/cat/0001.jpg"):
        load_dataset(_tar(tmp_path / "bad.tar.gz", files))


def test_cifar_batches_folder_and_unsafe_pickle(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 9]}
        (root / name).write_bytes(pickle.dumps(batch))
    ds = load_dataset(root)
    assert len(ds.train) == 20 and ds.train.images.shape[1:] == (32, 32, 3) and ds.class_names[9] == "truck"

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (root / "data_batch_1").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(CGDError, match="refusing to unpickle"):
        data._read_cifar_batches(root)


def test_no_data_message_says_where(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data, "FASHION_DIRS", [tmp_path / "none"])
    monkeypatch.setattr(data, "default_search_paths", lambda: [tmp_path / "nowhere"])
    with pytest.raises(CGDError, match="(?s)no dataset found.*nowhere.*--data PATH"):
        load_dataset("auto")


def test_fetch_without_internet_is_a_clear_error(monkeypatch):
    def refuse(*a, **k):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(data.urllib.request, "urlopen", refuse)
    with pytest.raises(CGDError, match="could not download .*--data PATH"):
        data.fetch_cifar10()


def test_imageset_is_immutable_and_validates():
    s = ImageSet(np.zeros((2, 4, 4, 3), np.uint8), np.array([0, 1]), ["a", "b"])
    with pytest.raises(ValueError):
        s.images[0, 0, 0, 0] = 1
    with pytest.raises(CGDError, match="duplicates"):
        ImageSet(np.zeros((2, 4, 4, 3), np.uint8), np.array([0, 1]), ["a", "a"])
    assert isinstance(Dataset(s, s).class_names, list)


@pytest.mark.parametrize("readme, folders, names, label0_red", [
    # Tiny-ImageNet / Imagenette: index, WordNet id, name (first synonym kept); the README's order is the label order
    ("Tiny subset\nClass list (index, wnid, words.txt name), order = wnids.txt:\n"
     "  000\tn02124075\tEgyptian cat\n  001\tn01443537\tgoldfish, Carassius auratus\n\nCaveats: none\n",
     ("n01443537", "n02124075"), ["Egyptian cat", "goldfish"], True),
    # GTSRB: numbered folders; the per-class count lines above the header are not names
    ("Per-class counts:\n  00 train=210 test=60\nClass names (class_id order):\n  00\tspeed limit 20 km/h\n"
     "  01\tstop\n", ("00", "01"), ["speed limit 20 km/h", "stop"], False),
])
def test_a_class_names_file_beside_a_tarball_names_and_orders_the_folders(tmp_path, readme, folders, names,
                                                                          label0_red):
    files = {f"{split}/{c}/{i}.jpg": _jpeg((200 * k, 0, 0)) for split in ("train", "val")  # the 2nd folder red
             for k, c in enumerate(folders) for i in range(2)}
    (tmp_path / "set.README.txt").write_text(readme)
    ds = load_dataset(_tar(tmp_path / "set.tar.gz", files))  # val/ is the test split
    assert ds.class_names == names and len(ds.test) == 4
    red = ds.train.images[..., 0].mean(axis=(1, 2)) > 100
    assert (red[ds.train.labels == 0] == label0_red).all()  # label 0 is the README's first class


def test_a_named_dataset_is_found_in_the_search_paths_or_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("CGD_DATA", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CGDError, match="gtsrb: none of gtsrb.tar.gz found"):
        load_dataset("gtsrb")
    files = {f"{split}/{c}/0.jpg": _jpeg((0, 0, 0)) for split in ("train", "test") for c in ("00", "01")}
    _tar(tmp_path / "gtsrb.tar.gz", files)
    assert load_dataset("gtsrb").class_names == ["00", "01"]  # no README: the folder names


def test_gtsrb_tracks_become_groups_that_travel_with_the_training_set(tmp_path):
    """Files named <track>_<frame> (GTSRB) give one group per (class, track); the groups survive the cache, an .npz,
    a subset and poisoning; other names give none."""
    from cgd import attacks

    files = {f"train/{c}/{t:05d}_{f:05d}.jpg": _jpeg((100 * k, 0, 0)) for k, c in enumerate(("00", "01"))
             for t in range(3) for f in range(4)}
    files.update({f"test/{c}/{i:05d}.jpg": _jpeg((0, 0, 0)) for c in ("00", "01") for i in range(2)})
    path = _tar(tmp_path / "signs.tar.gz", files)
    for ds in (load_dataset(path), load_dataset(path)):  # decoded, then from the cache
        g = ds.train.groups
        assert g is not None and len(np.unique(g)) == 6 and ds.test.groups is None
        for gid in np.unique(g):  # a group is 4 frames of one class
            assert (g == gid).sum() == 4 and len(np.unique(ds.train.labels[g == gid])) == 1
    save_npz(ds, tmp_path / "d.npz")
    assert (load_dataset(tmp_path / "d.npz").train.groups == g).all()
    assert (ds.train.subset(np.arange(0, 24, 2)).groups == g[::2]).all()
    assert (attacks.get("badnets", rate=0.2).poison(ds.train).train.groups == g).all()
    plain = {f"{s}/{c}/{i:04d}.jpg": _jpeg((0, 0, 0)) for s in ("train", "test") for c in ("a", "b") for i in range(2)}
    assert load_dataset(_tar(tmp_path / "plain.tar.gz", plain)).train.groups is None
    with pytest.raises(CGDError, match="groups must be integers, one per image"):
        ImageSet(ds.train.images, ds.train.labels, ds.class_names, g[:-1])
