"""Hostile data files and archives: crafted tarballs, npz files, pickles, images and idx files must be refused with
one clear `CGDError` line, bounded in memory, and never extracted to disk."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import random
import resource
import struct
import tarfile
import zipfile
import zlib

import numpy as np
import pytest
from numpy.lib import format as npy
from PIL import Image

from cgd import CGDError, cli, data
from cgd.data import load_dataset
from hostile import Sandbox, assert_refused, run_cli

MIB = 1 << 20
BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CGD_CACHE", str(tmp_path / "cache"))


# ------------------------------------------------------------------------------------------------ builders

def _arrays(n_train=8, n_test=4, size=8):
    rng = np.random.default_rng(0)
    return dict(x_train=rng.integers(0, 255, (n_train, size, size, 3), dtype=np.uint8), y_train=np.arange(n_train) % 2,
                x_test=rng.integers(0, 255, (n_test, size, size, 3), dtype=np.uint8), y_test=np.arange(n_test) % 2,
                class_names=np.array(["a", "b"]))


def _npz_bytes(**over) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{**_arrays(), **over})
    return buf.getvalue()


def _npy_header(shape, descr="|u1") -> bytes:
    buf = io.BytesIO()
    npy.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _deflate_zeros(head: bytes, zeros_mib: int, tail: bytes = b"") -> bytes:
    """Raw deflate of head + `zeros_mib` MiB of zeros + tail, built in O(output): a full flush resets the compressor,
    so one compressed MiB of zeros can be repeated verbatim."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    mib = c.compress(bytes(MIB)) + c.flush(zlib.Z_FULL_FLUSH)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(head) + c.flush(zlib.Z_FULL_FLUSH) + mib * zeros_mib + c.compress(tail) + c.flush()


def _raw_zip(members: list[tuple[str, bytes, int, int]]) -> bytes:
    """A zip of (name, deflated stream, declared uncompressed size, crc) members, written by hand so that the sizes
    and CRCs can lie."""
    out, central = io.BytesIO(), io.BytesIO()
    for name, stream, size, crc in members:
        offset, raw = out.tell(), name.encode()
        out.write(struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, 0, 8, 0, 0, crc, len(stream), size, len(raw), 0))
        out.write(raw + stream)
        central.write(struct.pack("<4s6H3I5H2I", b"PK\x01\x02", 20, 20, 0, 8, 0, 0, crc, len(stream), size,
                                  len(raw), 0, 0, 0, 0, 0, offset) + raw)
    cd = central.getvalue()
    end = struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, len(members), len(members), len(cd), out.tell(), 0)
    return out.getvalue() + cd + end


def _valid_members(skip=()) -> list[tuple[str, bytes, int, int]]:
    """The members of a valid tiny npz, deflated, for `_raw_zip`."""
    out = []
    with zipfile.ZipFile(io.BytesIO(_npz_bytes())) as zf:
        for info in zf.infolist():
            if info.filename.removesuffix(".npy") not in skip:
                payload = zf.read(info)
                c = zlib.compressobj(9, zlib.DEFLATED, -15)
                out.append((info.filename, c.compress(payload) + c.flush(), len(payload), zlib.crc32(payload)))
    return out


def _jpeg(rgb=(200, 0, 0), size=8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), rgb, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _png(w: int, h: int, idat: bytes | None = None) -> bytes:
    """An RGB PNG of w x h; `idat` defaults to a real (all-black) image, else the given (possibly far too short)
    compressed data: the header alone declares the size."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    if idat is None:
        idat = zlib.compress((b"\0" + bytes(3 * w)) * h, 1)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">2I5B", w, h, 8, 2, 0, 0, 0)) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))


def _image_files(**over) -> dict[str, bytes]:
    files = {f"{s}/{c}/{i}.jpg": _jpeg((200 * (c == "cat"), 0, 0)) for s in ("train", "test") for c in ("cat", "dog")
             for i in range(2)}
    files.update(over)
    return files


def _tar_bytes(files: dict[str, bytes], gz=True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tf:
        for name, payload in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def _write(path, payload: bytes):
    path.write_bytes(payload)
    return path


def _tar_entries(files: dict[str, bytes]) -> bytes:
    """Tar members without the end-of-archive marker, so that more can follow."""
    out = b""
    for name, payload in files.items():
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        out += info.tobuf(tarfile.GNU_FORMAT) + payload + bytes(-len(payload) % 512)
    return out


def _gzip_member_bomb(name: str, size_mib: int) -> bytes:
    """A valid image tarball (.tar.gz) plus one member `name` that declares and holds `size_mib` MiB of zeros. The
    gzip trailer's CRC is left wrong: a reader that respects the member cap never gets there."""
    info = tarfile.TarInfo(name)
    info.size = size_mib * MIB
    head = _tar_entries(_image_files()) + info.tobuf(tarfile.GNU_FORMAT)
    return (b"\x1f\x8b\x08\x00\0\0\0\0\x02\xff" + _deflate_zeros(head, size_mib, bytes(1024))
            + struct.pack("<2I", 0, (len(head) + info.size + 1024) % 2**32))


def _batch() -> bytes:
    rng = np.random.default_rng(0)
    return pickle.dumps({b"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 9]})


def _official(path, prefix=""):
    return _write(path, _tar_bytes({f"{prefix}cifar-10-batches-py/{n}": _batch() for n in BATCHES}))


def _cve_2025_4517(path, dest_len: int, escape_to: str) -> None:
    """The shape of CPython's test_realpath_limit_attack: nested folders reached through symlinks until the resolved
    path passes PATH_MAX (so `os.path.realpath` stops resolving), a symlink back up through that chain, `escape`
    pointing one level above the extraction folder, `escape2` two more up, and a file written through it at
    `escape2/<escape_to>`. `dest_len` is the length of the folder `extractall` would write into."""
    steps = "abcdefghijklmnop"
    component = "d" * ((os.pathconf("/", "PC_PATH_MAX") - dest_len - 1) // (len(steps) + 1))

    def add(tf, name, kind=tarfile.DIRTYPE, link="", payload=b""):
        info = tarfile.TarInfo(name)
        info.type, info.linkname, info.size, info.mode = kind, link, len(payload), 0o777
        tf.addfile(info, io.BytesIO(payload) if payload else None)

    with tarfile.open(path, "w:gz") as tf:
        base = ""
        for s in steps:
            add(tf, os.path.join(base, component))
            add(tf, os.path.join(base, s), tarfile.SYMTYPE, component)
            base = os.path.join(base, component)
        link = os.path.join(*steps, "l" * 254)
        add(tf, link, tarfile.SYMTYPE, os.path.join(*[".."] * len(steps)))
        add(tf, "escape", tarfile.SYMTYPE, os.path.join(link, ".."))
        add(tf, "escape2", tarfile.SYMTYPE, os.path.join("escape", "..", ".."))
        add(tf, os.path.join("escape2", escape_to), tarfile.REGTYPE, payload=b"written by an archive\n")


# ------------------------------------------------------------------------------------------------ npz

def test_npz_huge_declared_shape_is_refused_before_allocating(tmp_path):
    members = _valid_members(skip={"x_train"})
    payload = _npy_header((10**6, 224, 224, 3)) + bytes(64)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    members.append(("x_train.npy", c.compress(payload) + c.flush(), len(payload), zlib.crc32(payload)))
    with pytest.raises(CGDError, match=r"x_train: the header declares shape \(1000000, 224, 224, 3\)"):
        load_dataset(_write(tmp_path / "shape.npz", _raw_zip(members)))


def test_npz_zip_bomb_is_refused_from_the_directory(tmp_path):
    members = _valid_members(skip={"x_train"})
    members.append(("x_train.npy", _deflate_zeros(_npy_header((1536, 1024, 1024, 1)), 1536), 1536 * MIB + 128, 0))
    with pytest.raises(CGDError, match="x_train: declares .* bytes uncompressed, over the .*cap.*zip bomb"):
        load_dataset(_write(tmp_path / "bomb.npz", _raw_zip(members)))


def test_npz_member_longer_than_declared_is_read_only_as_declared(tmp_path):
    """A stream that decompresses past its declared size is cut at the declared size (zipfile's bound, kept)."""
    with zipfile.ZipFile(io.BytesIO(_npz_bytes())) as zf:
        payloads = {info.filename: zf.read(info) for info in zf.infolist()}
    members = [(name, _deflate_zeros(payload, 64), len(payload), zlib.crc32(payload))
               for name, payload in payloads.items()]
    ds = load_dataset(_write(tmp_path / "long.npz", _raw_zip(members)))
    assert (ds.train.images == _arrays()["x_train"]).all()


@pytest.mark.parametrize("cut", [0.5, 0.97])
def test_truncated_npz_is_one_clear_error(tmp_path, cut):
    raw = _npz_bytes()
    with pytest.raises(CGDError, match=r"t\.npz: (not an \.npz|corrupt or truncated)"):
        load_dataset(_write(tmp_path / "t.npz", raw[:int(len(raw) * cut)]))


def test_npz_bad_crc_is_one_clear_error(tmp_path):
    raw = bytearray(_npz_bytes())
    at = raw.index(b"\x93NUMPY") + 200  # inside x_train's data (the first member, stored)
    raw[at] ^= 0xFF
    with pytest.raises(CGDError, match=r"crc\.npz: corrupt or truncated \.npz .*CRC"):
        load_dataset(_write(tmp_path / "crc.npz", bytes(raw)))


@pytest.mark.parametrize("payload, what", [
    (pickle.dumps({"x_train": 1}), "it is a Python pickle"),
    (b"x_train,y_train\n1,2\n", "it is not a zip archive"),
    (b"", "the file is empty"),
    (_npy_header((2,)) + b"\0\0", "it is a single .npy array"),
])
def test_non_zip_npz_says_what_it_is(tmp_path, payload, what):
    with pytest.raises(CGDError, match=rf"fake\.npz: not an \.npz: {what}"):
        load_dataset(_write(tmp_path / "fake.npz", payload))


def test_npz_negative_dims_and_too_many_classes(tmp_path):
    members = _valid_members(skip={"y_train"})
    payload = _npy_header((-2, -4), "<i8") + bytes(64)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    members.append(("y_train.npy", c.compress(payload) + c.flush(), len(payload), zlib.crc32(payload)))
    with pytest.raises(CGDError, match="y_train: invalid array header"):
        load_dataset(_write(tmp_path / "neg.npz", _raw_zip(members)))
    with pytest.raises(CGDError, match="class_names must be a 1-D array of at most"):
        load_dataset(_write(tmp_path / "cls.npz", _npz_bytes(class_names=np.arange(20000).astype(str))))


# ------------------------------------------------------------------------------------------------ poison_mask

@pytest.mark.parametrize("mask, message", [
    (np.array([0, 1] * 4, dtype=object), "poison_mask: holds pickled Python objects"),
    (np.array([0, 1, 2, 0, 0, 0, 0, 0]), "poison_mask must hold only 0/1"),
    (np.array([0.0, 1.0] * 4), "poison_mask must hold only 0/1"),
    (np.zeros(5, dtype=bool), r"poison_mask must hold one entry per training image \(8\)"),
])
def test_bad_poison_mask_is_refused(tmp_path, mask, message):
    p = _write(tmp_path / "m.npz", _npz_bytes(poison_mask=mask))
    with pytest.raises(CGDError, match=message):
        cli._npz_mask(str(p), len(load_dataset(p).train))


def test_good_poison_mask_is_read(tmp_path):
    p = _write(tmp_path / "m.npz", _npz_bytes(poison_mask=np.array([0, 1] * 4, dtype=np.uint8)))
    assert cli._npz_mask(str(p), 8).tolist() == [False, True] * 4
    assert cli._npz_mask(str(_write(tmp_path / "n.npz", _npz_bytes())), 8) is None


# ------------------------------------------------------------------------------------------------ image tarballs

@pytest.mark.parametrize("gz, cut", [(True, 0.5), (False, 0.5), (True, 0.8)])
def test_truncated_tarball_is_one_clear_error(tmp_path, gz, cut):
    raw = _tar_bytes(_image_files(), gz=gz)
    with pytest.raises(CGDError, match=r"t\.tar(\.gz)?: (corrupt or truncated archive|.* is truncated)"):
        load_dataset(_write(tmp_path / ("t.tar.gz" if gz else "t.tar"), raw[:int(len(raw) * cut)]))


@pytest.mark.parametrize("cap, value, extra, message", [
    ("MAX_MEMBER_BYTES", 64 << 10, {"train/cat/9.jpg": _jpeg() + bytes(100_000)},
     "train/cat/9.jpg declares 10.* bytes, over the 65536-byte cap"),
    ("MAX_ARCHIVE_MEMBERS", 10, {f"x/{i}": b"" for i in range(9)}, "more than 10 archive entries"),
    ("MAX_ARCHIVE_BYTES", 1 << 20, {"pad": bytes(2 << 20)}, "the archive decompresses past the 1048576-byte cap"),
    ("MAX_DATASET_BYTES", 8 * 8 * 3 * 5, {}, "the decoded images pass the 960-byte cap on a dataset"),
])
def test_tarball_caps(tmp_path, monkeypatch, cap, value, extra, message):
    """Each cap, lowered so that a tiny archive passes it (raising=False: on a loader without the cap it is a no-op)."""
    monkeypatch.setattr(data, cap, value, raising=False)
    with pytest.raises(CGDError, match=message):
        load_dataset(_write(tmp_path / "caps.tar.gz", _tar_bytes(_image_files(**extra))))


@pytest.mark.parametrize("w, h, valid, message", [
    (30000, 30000, False, "decompression bomb refused"),  # PIL's DecompressionBombError
    (10000, 10000, False, "decompression bomb refused"),  # PIL only warns at this size
    (5000, 5000, True, "5000x5000 pixels is over the 16777216-pixel cap"),  # a real image PIL would decode
])
def test_png_decompression_bombs_are_refused(tmp_path, w, h, valid, message):
    png = _png(w, h, None if valid else zlib.compress(b"\0" * 100))
    p = _write(tmp_path / "png.tar.gz", _tar_bytes(_image_files(**{"train/cat/bomb.png": png})))
    with pytest.raises(CGDError, match=message):
        load_dataset(p)


def test_tarball_test_class_without_train_folder(tmp_path):
    p = _write(tmp_path / "cls.tar.gz", _tar_bytes(_image_files(**{"test/cow/0.jpg": _jpeg()})))
    with pytest.raises(CGDError, match=r"test classes \['cow'\] have no train folder"):
        load_dataset(p)


def test_other_image_formats_are_refused(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="GIF")
    p = _write(tmp_path / "gif.tar.gz", _tar_bytes(_image_files(**{"train/cat/0.jpg": buf.getvalue()})))
    with pytest.raises(CGDError, match="corrupt image .*train/cat/0.jpg"):
        load_dataset(p)


# ------------------------------------------------------------------------------------------------ CIFAR archive

@pytest.mark.parametrize("prefix", ["", "./"])
def test_official_archive_is_read_in_memory(tmp_path, prefix):
    ds = load_dataset(_official(tmp_path / "cifar-10-python.tar.gz", prefix=prefix))
    assert len(ds.train) == 20 and len(ds.test) == 4 and ds.class_names == data.CIFAR10_CLASSES
    assert not (tmp_path / "cache" / "downloads").exists()


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_official_archive_link_member_is_refused(tmp_path, kind):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for n in BATCHES:
            info = tarfile.TarInfo(f"cifar-10-batches-py/{n}")
            if n == "data_batch_1":
                info.type, info.linkname = kind, "cifar-10-batches-py/data_batch_2"
                tf.addfile(info)
            else:
                payload = _batch()
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    with pytest.raises(CGDError, match="data_batch_1 is not a regular file"):
        load_dataset(_write(tmp_path / "cifar-10-python.tar.gz", buf.getvalue()))


def test_official_archive_cve_2025_4517_writes_nothing(tmp_path):
    target = tmp_path / "outside-target"
    extract = tmp_path / "cache" / "downloads" / "extract"  # where the old loader extracted to
    p = tmp_path / "cifar-10-python.tar.gz"
    _cve_2025_4517(p, len(str(extract)), target.name)  # escape2 is extract/../../.. = tmp_path
    with pytest.raises(Exception) as refused:
        load_dataset(p)
    assert not target.exists(), f"the archive wrote {target} through its links"
    assert not extract.exists()
    assert refused.type is CGDError and "not the official CIFAR-10 archive: missing" in str(refused.value)


class _Encode:
    """Pickles as `_codecs.encode(text, "latin1")`: many of them over one memoised text amplify the pickle."""

    def __init__(self, text):
        self.text = text

    def __reduce__(self):
        import codecs

        return codecs.encode, (self.text, "latin1")


def _amplifying_batch() -> bytes:
    text = "x" * MIB
    return pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 4,
                         b"pad": [_Encode(text) for _ in range(10)]}, protocol=2)


@pytest.mark.parametrize("payload, message", [
    (b"\x8e" + struct.pack("<Q", 1 << 40) + b"xx.", "truncated pickle"),  # BINBYTES8 declaring 1 TiB
    (_amplifying_batch(), "the pickle builds more data than it holds"),
    (pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 4, b"pad": list(range(300_000))}),
     "more than 200000 pickle opcodes"),
    (b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nJ\x00\x00\x00\x40\x85U\x01b\x87R.",
     r"unexpected array shape \(1073741824,\)"),
    (pickle.dumps({b"data": np.zeros((4, 3072), np.float32), b"labels": [0] * 4}), "not a CIFAR batch"),
    (pickle.dumps([1, 2]), "not a CIFAR batch"),
])
def test_crafted_cifar_batch_is_refused(tmp_path, payload, message):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for n in BATCHES:
        (root / n).write_bytes(payload if n == "data_batch_1" else _batch())
    with pytest.raises(CGDError, match=message):
        load_dataset(root)


def test_cifar_batch_file_size_is_capped(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_MEMBER_BYTES", 1000, raising=False)
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for n in BATCHES:
        (root / n).write_bytes(_batch())
    with pytest.raises(CGDError, match="data_batch_1 is larger than 1,000 bytes: over the cap on a CIFAR batch"):
        load_dataset(root)


def test_fetch_reads_a_bounded_response(monkeypatch):
    class Endless:
        """A server that never stops sending."""

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self, n=-1):
            assert 0 <= n <= 512 * MIB, f"unbounded read({n}) of an endless response"
            return b"x" * n

    monkeypatch.setattr(data, "MAX_DOWNLOAD_BYTES", 1000, raising=False)
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda *a, **k: Endless())
    with pytest.raises(CGDError, match="sent more than 1000 bytes"):
        data.fetch_cifar10()
    assert not list((data.cache_dir("downloads")).iterdir())


# ------------------------------------------------------------------------------------------------ idx (Fashion-MNIST)

def _idx_gz(path, dims, body: bytes):
    return _write(path, gzip.compress(bytes([0, 0, 8, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims)
                                      + body))


@pytest.mark.parametrize("dims, body, message", [
    ((60000, 28, 28), bytes(10), r"declares \[60000, 28, 28\] \(47040000 bytes\) but the data is 10 bytes"),
    ((3, 2), bytes(7), "but the data is longer"),
    ((100000, 100000, 100000), b"", "over the 1073741824-byte cap"),
])
def test_idx_header_is_checked_against_the_data(tmp_path, dims, body, message):
    with pytest.raises(CGDError, match=message):
        data._read_idx(_idx_gz(tmp_path / "x-idx3-ubyte.gz", dims, body))


def test_idx_corrupt_gzip_is_one_clear_error(tmp_path):
    raw = _idx_gz(tmp_path / "a.gz", (4, 2), bytes(8)).read_bytes()
    with pytest.raises(CGDError, match="corrupt or truncated gzip"):
        data._read_idx(_write(tmp_path / "b.gz", raw[:-6]))
    with pytest.raises(CGDError, match="not a uint8 idx file"):
        data._read_idx(_write(tmp_path / "c.gz", gzip.compress(b"\x00\x00\x0d\x01" + bytes(8))))


# ------------------------------------------------------------------------------------------------ fuzz

def _mutate(raw: bytes, rng: random.Random, hot: list[int]) -> bytes:
    """One seeded byte-level mutation; positions lean towards `hot` offsets (headers, the zip directory)."""
    b = bytearray(raw)
    at = min(len(b) - 1, rng.choice(hot) + rng.randrange(64)) if hot and rng.random() < 0.6 else rng.randrange(len(b))
    op = rng.choice(["flip", "overwrite", "insert", "delete", "truncate"])
    if op == "flip":
        b[at] ^= 1 << rng.randrange(8)
    elif op == "overwrite":
        n = rng.randint(1, 8)
        b[at:at + n] = bytes(rng.choice([0, 0xFF, rng.randrange(256)]) for _ in range(n))
    elif op == "insert":
        b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    elif op == "delete":
        del b[at:at + rng.randint(1, 16)]
    else:
        del b[at:]
    return bytes(b)


def _hot_offsets(raw: bytes, *magics: bytes) -> list[int]:
    out = []
    for m in magics:
        i = raw.find(m)
        while i >= 0:
            out.append(i)
            i = raw.find(m, i + 1)
    return out


@pytest.mark.parametrize("kind", ["npz", "tar", "tar.gz"])
def test_fuzzed_files_load_or_raise_cgderror(tmp_path, kind):
    if kind == "npz":
        raw = _npz_bytes()
        hot = _hot_offsets(raw, b"PK\x01\x02", b"PK\x05\x06", b"PK\x03\x04", b"\x93NUMPY", b"{'descr'")
    else:
        raw = _tar_bytes(_image_files(), gz=kind == "tar.gz")
        hot = list(range(0, len(raw), 512)) if kind == "tar" else [0]
    rng = random.Random(f"cgd-{kind}")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    outcomes = {"loaded": 0, "refused": 0}
    for i in range(300):
        p = _write(tmp_path / f"m{i}.{kind}", _mutate(raw, rng, hot))
        try:
            ds = load_dataset(p)
        except CGDError:
            outcomes["refused"] += 1
        else:
            assert isinstance(ds, data.Dataset) and len(ds.train) and len(ds.test)
            outcomes["loaded"] += 1
    assert outcomes["refused"] > 20, outcomes  # the mutations do reach the parsers
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024
    assert grown < 256 * MIB, f"peak RSS grew by {grown / MIB:.0f} MiB"


# ------------------------------------------------------------------------------------------------ the CLI, end to end

@pytest.fixture
def box(tmp_path):
    return Sandbox(tmp_path / "box")


def _cve_archive(box: Sandbox):
    """The CVE-2025-4517 archive aimed at box/outside/newfile from the old extraction folder."""
    extract = box.cache / "downloads" / "extract"
    p = box.work / "cifar-10-python.tar.gz"
    _cve_2025_4517(p, len(str(extract)), os.path.join("outside", "newfile"))  # extract/../../.. is box.root
    return p, box.root / "outside" / "newfile"


def test_cli_cve_2025_4517_data_info(box):
    p, target = _cve_archive(box)
    res = run_cli(box, "data", "info", str(p))
    assert not target.exists(), f"the archive wrote {target} through its links"
    assert_refused(res, "data", "not the official CIFAR-10 archive", str(p), box=box)


def test_cli_cve_2025_4517_defend(box):
    p, target = _cve_archive(box)
    run = box.work / "run"
    res = run_cli(box, "defend", "--data", str(p), "--out", str(run))
    assert not target.exists(), f"the archive wrote {target} through its links"
    assert_refused(res, "defend", "not the official CIFAR-10 archive", str(p), box=box, run_dir=run)


def test_cli_npz_zip_bomb(box):
    members = _valid_members(skip={"x_train"})
    members.append(("x_train.npy", _deflate_zeros(_npy_header((1536, 1024, 1024, 1)), 1536), 1536 * MIB + 128, 0))
    p = _write(box.work / "bomb.npz", _raw_zip(members))
    assert_refused(run_cli(box, "data", "info", str(p)), "data", "zip bomb", "bomb.npz:x_train", box=box)


def test_cli_npz_huge_declared_shape(box):
    members = _valid_members(skip={"x_train"})
    payload = _npy_header((10**6, 224, 224, 3)) + bytes(64)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    members.append(("x_train.npy", c.compress(payload) + c.flush(), len(payload), zlib.crc32(payload)))
    p = _write(box.work / "shape.npz", _raw_zip(members))
    assert_refused(run_cli(box, "data", "info", str(p)), "data", "declares shape (1000000, 224, 224, 3)", box=box)


def test_cli_non_zip_npz(box):
    p = _write(box.work / "text.npz", b"this is a csv file, not an npz\n")
    assert_refused(run_cli(box, "data", "info", str(p)), "data", "text.npz: not an .npz: it is not a zip archive",
                   box=box)


def test_cli_tarball_member_bomb(box):
    p = _write(box.work / "bomb.tar.gz", _gzip_member_bomb("train/cat/bomb.jpg", 2560))
    assert_refused(run_cli(box, "data", "info", str(p)), "data", "train/cat/bomb.jpg declares 2684354560 bytes",
                   box=box)


def test_cli_png_decompression_bomb_in_tarball(box):
    png = _png(30000, 30000, zlib.compress(b"\0" * 100))
    p = _write(box.work / "png.tar.gz", _tar_bytes(_image_files(**{"train/cat/bomb.png": png})))
    assert_refused(run_cli(box, "data", "info", str(p)), "data", "train/cat/bomb.png: decompression bomb refused",
                   box=box)


def test_cli_object_poison_mask_via_defend(box):
    p = _write(box.work / "mask.npz", _npz_bytes(poison_mask=np.array([0, 1] * 4, dtype=object)))
    run = box.work / "run"
    res = run_cli(box, "defend", "--data", str(p), "--out", str(run))
    assert_refused(res, "defend", "mask.npz:poison_mask: holds pickled Python objects", box=box, run_dir=run)


def test_a_fifo_named_like_a_cifar_batch_is_refused_not_waited_on(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for n in BATCHES:
        (root / n).write_bytes(_batch())
    (root / "data_batch_1").unlink()
    os.mkfifo(root / "data_batch_1")  # opening it for reading would block until a writer came
    with pytest.raises(CGDError, match="data_batch_1: not a regular file"):
        load_dataset(root)


# ------------------------------------------------------------------------------------------------ image folders

def _image_folder(root, per_class=3):
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / split / c / f"{i}.png")
    return root


def test_image_folder_is_read_with_its_classes_txt(tmp_path):
    root = _image_folder(tmp_path / "d")
    ds = load_dataset(root)
    assert ds.train.class_names == ["a", "b"] and ds.train.images.shape == (6, 8, 8, 3) and len(ds.test) == 6
    for split in ("train", "test"):  # folders named by index, names from classes.txt
        for i, c in enumerate("ab"):
            (root / split / c).rename(root / split / str(i))
    (root / "classes.txt").write_text("Classes:\n0  alpha\n1  beta\n")
    assert load_dataset(root).train.class_names == ["alpha", "beta"]


def test_image_folder_link_is_refused(tmp_path):
    root = _image_folder(tmp_path / "d")
    secret = tmp_path / "secret.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(secret)
    (root / "train" / "a" / "9.png").symlink_to(secret)
    with pytest.raises(CGDError, match="symbolic link in a data folder; refused"):
        load_dataset(root)


def test_image_folder_fifo_and_bomb_are_refused_not_waited_on(tmp_path):
    root = _image_folder(tmp_path / "d")
    os.mkfifo(root / "train" / "b" / "9.png")
    with pytest.raises(CGDError, match="not a regular file"):
        load_dataset(root)
    (root / "train" / "b" / "9.png").unlink()
    Image.new("L", (5000, 5000)).save(root / "train" / "b" / "9.png")
    with pytest.raises(CGDError, match="pixels"):
        load_dataset(root)
