"""Photo metadata (EXIF date, camera, GPS, folder): read by the decode workers into the catalog, and filled in
for an index from before metadata without re-embedding. Real JPEGs with real EXIF written by Pillow."""

from __future__ import annotations

import os
import shutil

import pytest
from PIL import Image
from PIL.TiffImagePlugin import IFDRational

from indexer.reader import photo_meta, read_meta
from indexer.runner import IndexConfig, index_folder
from indexer.snapshot import Snapshot
from indexer.writer import Writer

CFG = IndexConfig(batch_size=8, workers=0, progress=False)


def write_exif(src, dst, *, original=None, datetime=None, make=None, model=None, gps=None, orientation=None) -> None:
    """Save photo ``src`` as a JPEG at ``dst`` with these EXIF fields; gps = (lat, lon) in signed degrees."""
    img = Image.open(src).convert("RGB")
    exif = Image.Exif()
    if make:
        exif[0x010F] = make
    if model:
        exif[0x0110] = model
    if orientation:
        exif[0x0112] = orientation
    if datetime:
        exif[0x0132] = datetime
    if original:
        exif.get_ifd(0x8769)[0x9003] = original
    if gps:
        g = exif.get_ifd(0x8825)

        def dms(v):
            v = abs(v)
            d, m = int(v), int((abs(v) - int(v)) * 60)
            s = (v - d - m / 60) * 3600
            return (IFDRational(d, 1), IFDRational(m, 1), IFDRational(round(s * 100), 100))

        g[1], g[2] = ("N" if gps[0] >= 0 else "S"), dms(gps[0])
        g[3], g[4] = ("E" if gps[1] >= 0 else "W"), dms(gps[1])
    dst.parent.mkdir(parents=True, exist_ok=True)
    img.save(dst, "JPEG", quality=85, exif=exif)


def test_exif_fields_from_real_jpegs(photos, tmp_path):
    src = sorted(photos.rglob("*.jpg"))[0]
    write_exif(src, tmp_path / "a.jpg", original="2019:07:14 10:30:00", datetime="2020:01:01 00:00:00",
               make="Canon", model="Canon EOS 5D Mark IV", gps=(-33.8568, 151.2153), orientation=6)
    m = photo_meta((tmp_path / "a.jpg").read_bytes(), 0)
    assert (m.taken, m.taken_source, m.make, m.model, m.orientation) == (
        "2019-07-14T10:30:00", "DateTimeOriginal", "Canon", "Canon EOS 5D Mark IV", 6)
    assert m.lat == pytest.approx(-33.8568, abs=1e-4) and m.lon == pytest.approx(151.2153, abs=1e-4)
    write_exif(src, tmp_path / "b.jpg", datetime="2020:02:03 04:05:06", gps=(40.0, -74.5))
    m = photo_meta((tmp_path / "b.jpg").read_bytes(), 0)
    assert (m.taken, m.taken_source, m.make) == ("2020-02-03T04:05:06", "DateTime", None)
    assert (m.lat, m.lon) == (pytest.approx(40.0), pytest.approx(-74.5))
    os.utime(src, ns=(1_600_000_000 * 10**9, 1_600_000_000 * 10**9))  # no EXIF: the file's mtime, and said so
    m = read_meta(src, os.stat(src).st_mtime_ns)
    assert m.taken_source == "mtime" and m.taken[:4] == "2020" and m.lat is None and m.make is None


def test_broken_exif_never_fails_a_photo(photos, tmp_path, embedder):
    src = sorted(photos.rglob("*.jpg"))[0]
    write_exif(src, tmp_path / "x.jpg", original="0000:00:00 00:00:00", make="Nikon")  # blank date cameras write
    assert photo_meta((tmp_path / "x.jpg").read_bytes(), None).taken is None
    data = bytearray((tmp_path / "x.jpg").read_bytes())
    at = data.find(b"Exif\x00\x00") + 6
    data[at:at + 8] = b"\xde\xad\xbe\xef" * 2  # the TIFF header of the EXIF block destroyed
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "broken.jpg").write_bytes(bytes(data))
    shutil.copy(tmp_path / "x.jpg", folder / "blank.jpg")
    stats = index_folder(folder, tmp_path / "idx", embedder, CFG)
    assert stats.indexed == 2 and stats.failed == 0
    db = Snapshot.open(tmp_path / "idx").catalog()
    rows = dict(db.execute("SELECT p.path, m.taken_source FROM meta m JOIN photos p ON p.id = m.photo_id").fetchall())
    assert set(rows.values()) == {"mtime"}


def test_catalog_holds_metadata_and_an_old_index_gets_it_without_re_embedding(photos, tmp_path, embedder):
    files = sorted(photos.rglob("*.jpg"))
    write_exif(files[1], photos / "trip" / "canon.jpg", original="2018:05:01 12:00:00", make="Canon", model="EOS R",
               gps=(48.8584, 2.2945))
    idx = tmp_path / "idx"
    index_folder(photos, idx, embedder, CFG)
    db = Snapshot.open(idx).catalog()
    n = db.execute("SELECT count(*) FROM photos WHERE status='indexed'").fetchone()[0]
    assert db.execute("SELECT count(*) FROM meta").fetchone()[0] == n == 49
    row = db.execute("SELECT taken, taken_source, make, model, lat, lon, folder FROM meta m JOIN photos p ON p.id = m.photo_id "
                     "WHERE p.path = ?", (os.fsencode(photos / "trip" / "canon.jpg"),)).fetchone()
    assert row[:4] == ("2018-05-01T12:00:00", "DateTimeOriginal", "Canon", "EOS R")
    assert row[4] == pytest.approx(48.8584, abs=1e-4) and os.fsdecode(row[6]) == str(photos / "trip")
    before = {r[0]: r[1:] for r in db.execute("SELECT * FROM meta")}
    with Writer(idx, Snapshot.open(idx).manifest) as w:  # an index written before metadata existed
        w.db.execute("DELETE FROM meta")
        w.dirty = True
        w.commit()
    stats = index_folder(photos, idx, embedder, CFG)
    assert stats.indexed == 0 and stats.unchanged == 49 and stats.described == 49
    db = Snapshot.open(idx).catalog()
    assert {r[0]: r[1:] for r in db.execute("SELECT * FROM meta")} == before
    (photos / "trip" / "canon.jpg").unlink()  # a deleted photo's metadata goes with it
    index_folder(photos, idx, embedder, CFG)
    assert Snapshot.open(idx).catalog().execute("SELECT count(*) FROM meta").fetchone()[0] == 48
